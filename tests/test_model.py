"""The embedded Qwen3 decoder: shapes, the KV cache written by index, per-row positions, checkpoint loading."""

import json

import pytest
import torch

from bi_compile.model import PRESETS, ModelError, Transformer, build_model, generate

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32 on CPU: eager kernels may round differently for different row counts


@pytest.fixture(scope="module")
def tiny():
    model = build_model("tiny", seed=0)
    model.setup_caches(max_batch=4, max_seq=32)
    return model


def random_tokens(n, seed, vocab=PRESETS["tiny"].vocab_size):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def positions(*rows):
    return torch.tensor([list(r) for r in rows])


def test_forward_shapes_and_dtype(tiny):
    cfg = tiny.config
    logits = tiny(torch.stack([random_tokens(5, 0), random_tokens(5, 1)]), positions(range(5), range(5)))
    assert logits.shape == (2, 5, cfg.vocab_size) and logits.dtype == torch.float32
    assert tiny.layers[0].self_attn.kv_cache.k.shape == (4, cfg.num_kv_heads, 32, cfg.head_dim)


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = (build_model("tiny", seed=s) for s in (3, 3, 4))
    assert torch.equal(a.layers[1].mlp.up_proj.weight, b.layers[1].mlp.up_proj.weight)
    assert not torch.equal(a.layers[1].mlp.up_proj.weight, c.layers[1].mlp.up_proj.weight)


def test_prefill_then_decode_equals_full_recompute(tiny):
    tokens = random_tokens(9, 2)[None]
    full = tiny(tokens, positions(range(9)))
    prefix = tiny(tokens[:, :6], positions(range(6)))
    steps = [tiny(tokens[:, p : p + 1], positions([p])) for p in range(6, 9)]
    torch.testing.assert_close(torch.cat([prefix, *steps], dim=1), full, **TOL)


def test_future_slots_are_masked(tiny):
    """Key j is visible to the query at position p iff j <= p: stale slots past p change nothing, not one bit."""
    tokens = random_tokens(5, 3)[None]
    for layer in tiny.layers:
        layer.self_attn.kv_cache.k.zero_()
        layer.self_attn.kv_cache.v.zero_()
    clean = tiny(tokens, positions(range(5)))
    tiny(random_tokens(9, 4)[None], positions(range(9)))  # another request's keys in slots 0..8
    torch.testing.assert_close(tiny(tokens, positions(range(5))), clean, rtol=0, atol=0)


def test_rows_keep_their_own_positions(tiny):
    """Two rows decoding at different positions in one call match each row decoded alone."""
    a, b = random_tokens(7, 5), random_tokens(3, 6)
    tiny(torch.stack([a[:6], torch.cat([b[:2], b[:2], b[:2]])]), positions(range(6), range(6)))  # b padded to 6
    batched = tiny(torch.stack([a[6:], b[2:]]), positions([6], [2]))
    alone_a = tiny(a[None], positions(range(7)))[:, -1]
    alone_b = tiny(b[None], positions(range(3)))[:, -1]
    torch.testing.assert_close(batched[:, 0], torch.cat([alone_a, alone_b]), **TOL)


def test_generate_batch_matches_each_prompt_alone(tiny):
    prompts = [random_tokens(n, 10 + n) for n in (4, 11, 2)]
    batched = generate(tiny, prompts, steps=5)
    assert batched.tokens.shape == batched.logprobs.shape == (3, 5)
    for row, prompt in enumerate(prompts):
        alone = generate(tiny, [prompt], steps=5)
        assert torch.equal(alone.tokens[0], batched.tokens[row])
        torch.testing.assert_close(alone.logprobs[0], batched.logprobs[row], **TOL)
    assert (batched.logprobs <= 0).all()


def test_generate_checks_cache_room(tiny):
    with pytest.raises(ModelError, match="do not fit the caches"):
        generate(tiny, [random_tokens(30, 0)], steps=5)
    with pytest.raises(ModelError, match="max batch 4"):
        generate(tiny, [random_tokens(3, 0)] * 5, steps=1)


def test_compiles_whole_with_dynamic_shapes(tiny):
    """No data-dependent Python control flow: fullgraph capture of prefill and decode at any batch size."""
    torch._dynamo.reset()
    compiled = torch.compile(tiny, backend="eager", fullgraph=True, dynamic=True)
    prompts = [random_tokens(n, n) for n in (3, 6, 5)]
    assert torch.equal(generate(tiny, prompts, 3, forward=compiled).tokens, generate(tiny, prompts, 3).tokens)
    generate(tiny, prompts[:2], 3, forward=compiled)  # another batch size, same graphs
    torch._dynamo.reset()


def test_presets_have_the_published_sizes():
    with torch.device("meta"):
        sizes = {name: sum(p.numel() for p in Transformer(PRESETS[name]).parameters()) for name in PRESETS}
    assert 0.55e9 < sizes["qwen3-0.6b"] < 0.65e9  # the tied embedding counts once
    assert 1.6e9 < sizes["qwen3-1.7b"] < 1.8e9
    assert 8.0e9 < sizes["qwen3-8b"] < 8.4e9


def test_unknown_model_is_one_clear_line():
    with pytest.raises(ModelError, match="unknown model 'nope'") as info:
        build_model("nope")
    assert "\n" not in str(info.value)


def test_non_qwen3_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelError, match="only Qwen3"):
        build_model(str(tmp_path))


@pytest.mark.parametrize("tied", [True, False])
def test_loads_hugging_face_checkpoint_and_matches_it(tmp_path, tied):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    config = transformers.Qwen3Config(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    reference = transformers.Qwen3ForCausalLM(config).eval()
    reference.save_pretrained(tmp_path, safe_serialization=True)

    model = build_model(str(tmp_path))
    assert model.config.tie_word_embeddings == tied and model.config.head_dim == 16
    model.setup_caches(max_batch=1, max_seq=16)
    tokens = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(tokens).logits
    torch.testing.assert_close(model(tokens, positions(range(10))), expected, rtol=1e-4, atol=1e-4)
