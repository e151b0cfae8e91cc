"""A tiny Qwen3 (transformers, random weights) compiled whole: bitwise batch invariance under bi_ascend, and the
same check under stock Inductor as the control that shows the check can fail."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

BATCH_SIZES = (2, 3, 5, 8, 13, 21, 32)
PROMPT_LEN = 6


@pytest.fixture(scope="module")
def tiny_qwen3():
    config = transformers.Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.Qwen3ForCausalLM(config).eval()


def mismatching_batch_sizes(model, backend, **options) -> list[int]:
    """Batch sizes at which a prompt's logits inside a batch (at a random position) differ from its logits alone."""
    torch._dynamo.reset()
    forward = torch.compile(lambda ids: model(ids, use_cache=False).logits, backend=backend, dynamic=True, **options)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 512, (1, PROMPT_LEN), generator=gen)
    mismatches = []
    with torch.no_grad():
        alone = forward(prompt)[0]
        for m in BATCH_SIZES:
            batch = torch.randint(0, 512, (m, PROMPT_LEN), generator=gen)
            position = int(torch.randint(m, (1,), generator=gen))
            batch[position] = prompt[0]
            if not torch.equal(forward(batch)[position], alone):
                mismatches.append(m)
    return mismatches


@pytest.mark.parametrize("inner", ["inductor", "eager"])
def test_bi_ascend_logits_are_bitwise_batch_invariant(tiny_qwen3, inner):
    import bi_compile

    bi_compile.clear_reports()
    assert mismatching_batch_sizes(tiny_qwen3, "bi_ascend", options={"inner": inner, "strict": True}) == []
    rewrites = bi_compile.passes.Report.merge(bi_compile.reports()).rewrites
    assert rewrites["aten.mm.default -> bi.linear"] > 0 and any("bi.attention" in r for r in rewrites)


def test_control_stock_inductor_is_not_batch_invariant(tiny_qwen3):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # stock CPU kernels split work across threads by shape; with one thread some don't
    try:
        assert mismatching_batch_sizes(tiny_qwen3, "inductor") != []
    finally:
        torch.set_num_threads(threads)
