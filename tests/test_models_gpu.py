"""Batch invariance of real architectures on the GPU, in graph mode.

transformers models built from their configs (random bf16 weights, real layer shapes, cut to 2 layers: Qwen3, Qwen3-MoE,
Llama 3, Gemma 3, and the LayerNorm families GPT-2, Pythia, Phi-2 and StarCoder2) are compiled
with ``bi_ascend`` (strict: the audit must find nothing variant or unknown), and their decode step is captured in a
CUDA graph per batch size (the FULL_DECODE_ONLY shape). Prompts have ragged lengths; each row keeps its own KV
positions (``benchmarks/rowcache.py``), so a prompt occupies the same cache slots alone and inside any batch. A probe
prompt alone (batch 1) and at a random row of batches of 2..64 must give bitwise equal next-token logits over 32
greedy steps.

Controls: the same check with stock Inductor must find a difference on Llama 3 (8B shapes: cuBLAS picks other
kernels for the 4096-wide projections once the batch grows), and so must stock eager, which the dispatcher-override
baseline (``benchmarks/override.py``) then makes invariant.

    python3 -m pytest -m gpu tests/test_models_gpu.py                      # every case
    python3 -m pytest -m gpu tests/test_models_gpu.py -k native_launch     # bi_ascend with native_launch=True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

transformers = pytest.importorskip("transformers")

import bi_compile  # noqa: E402
import bi_compile.backend  # noqa: E402,F401  (registers bi_ascend where no entry point does: a source tree)
from benchmarks.decode import build_causal_lm, qwen3_config  # noqa: E402
from benchmarks.override import batch_invariant_override  # noqa: E402
from benchmarks.rowcache import GraphStep, RowCache, RowStep, generate  # noqa: E402

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
STEPS = 32
BATCH_SIZES = (2, 7, 23, 64)


def qwen3_moe_config():
    """Qwen3-30B-A3B shapes, 2 layers."""
    return transformers.Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, num_hidden_layers=2, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-6, max_position_embeddings=40960,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, tie_word_embeddings=False)


def llama3_config():
    """Llama-3.1-8B shapes (llama3 RoPE scaling), 2 layers."""
    return transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=False)


def gemma3_config():
    """gemma-3-1b shapes: (1 + weight) RMSNorm scale, one sliding-window and one global layer. The window is cut
    from 512 to 16 so that it slides within the test's prompts + 32 steps."""
    return transformers.Gemma3TextConfig(
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, rms_norm_eps=1e-6,
        max_position_embeddings=32768, sliding_window=16, layer_types=["sliding_attention", "full_attention"])


def gpt2_config():
    """GPT-2 (124M) shapes: LayerNorm, Conv1D projections (addmm with an [in, out] weight), learned positions, tied
    embeddings, 2 layers."""
    return transformers.GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=2, n_head=12,
                                   bos_token_id=50256, eos_token_id=50256)


def pythia_config():
    """Pythia-1.4B (GPT-NeoX) shapes: LayerNorm, parallel residual, rotary on a quarter of each head, 2 layers."""
    return transformers.GPTNeoXConfig(
        vocab_size=50304, hidden_size=2048, intermediate_size=8192, num_hidden_layers=2, num_attention_heads=16,
        max_position_embeddings=2048, layer_norm_eps=1e-5, use_parallel_residual=True, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})


def phi2_config():
    """Phi-2 shapes: one LayerNorm a layer feeding attention and MLP in parallel, partial rotary, a biased lm_head,
    2 layers."""
    return transformers.PhiConfig(
        vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=2, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=2048, layer_norm_eps=1e-5, hidden_act="gelu_new",
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.4})


def starcoder2_config():
    """StarCoder2-3B shapes: LayerNorm with biases everywhere, GQA (24 query heads, 2 kv heads), 2 layers. Its
    4096-token sliding window is longer than the test's sequences."""
    return transformers.Starcoder2Config(
        vocab_size=49152, hidden_size=3072, intermediate_size=12288, num_hidden_layers=2, num_attention_heads=24,
        num_key_value_heads=2, max_position_embeddings=16384, sliding_window=4096, norm_epsilon=1e-5, use_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 999999.4420358813}, bos_token_id=0, eos_token_id=0)


@dataclass(frozen=True)
class Case:
    config: Callable
    prompt_lengths: tuple[int, int]  # [low, high)
    tolerance: float  # ||bi - eager|| / ||eager|| over the probe's logits: catches a kernel that is invariant but wrong
    experts: str | None = None  # transformers experts implementation (MoE)


MODELS = {
    "qwen3-0.6b": Case(lambda: qwen3_config("qwen3-0.6b", layers=2), (3, 17), 3e-2),
    # Short prompts: batched_mm gathers one [2 * 768, 2048] weight copy per (token, expert) pair, 8 pairs a token.
    # A looser tolerance: a near-tie in the router may pick another expert in bf16 than in the eager reference.
    "qwen3-30b-a3b": Case(qwen3_moe_config, (2, 6), 1e-1, experts="batched_mm"),
    # transformers' default experts: torch._grouped_mm over the tokens sorted by expert -> bi.grouped_mm.
    "qwen3-30b-a3b-grouped-mm": Case(qwen3_moe_config, (3, 17), 1e-1),
    "llama-3.1-8b": Case(llama3_config, (3, 17), 3e-2),
    "gemma-3-1b": Case(gemma3_config, (3, 17), 3e-2),
    # LayerNorm families: every norm becomes bi.layer_norm.
    "gpt2": Case(gpt2_config, (3, 17), 3e-2),
    "pythia-1.4b": Case(pythia_config, (3, 17), 3e-2),
    "phi-2": Case(phi2_config, (3, 17), 3e-2),
    "starcoder2-3b": Case(starcoder2_config, (3, 17), 3e-2),
}
LAYER_NORM_FAMILIES = ("gpt2", "pythia-1.4b", "phi-2", "starcoder2-3b")


@pytest.fixture(scope="module")
def models():
    built = {}

    def get(name):
        if name not in built:
            case = MODELS[name]
            model = build_causal_lm(case.config(), device=DEVICE)
            if case.experts:  # "batched_mm": bmm + sum, the other path transformers offers
                model.set_experts_implementation(case.experts)
            built[name] = model
        return built[name]

    return get


@dataclass
class ProbeRuns:
    alone: torch.Tensor  # [STEPS, V]: next-token logits of the probe alone (batch 1)
    sequence: torch.Tensor  # the probe followed by its first STEPS - 1 greedy tokens
    mismatches: dict[int, list[int]]  # batch -> decode steps whose logits differ inside that batch
    batches_agree: bool  # the probe's logits are bitwise equal across all the batches (batch 1 aside)


def probe_runs(model, lengths, backend: str | None, *, graph: bool = True, native_launch: bool = False,
               seed: int = 0) -> ProbeRuns:
    """The probe prompt alone and at a random row of each of ``BATCH_SIZES`` (other prompts of random lengths in
    [low, high)), through ``backend`` (None: eager; bi_ascend with its option ``native_launch``), the decode step
    captured in a CUDA graph when ``graph``."""
    torch._dynamo.reset()
    low, high = lengths
    cache = RowCache(model.config, max(BATCH_SIZES), high + STEPS, dtype=model.dtype, device=DEVICE)
    step = RowStep(model, cache)
    if backend is not None:
        options = ({"options": {"inner": "inductor", "strict": True, "native_launch": native_launch}}
                   if backend == "bi_ascend" else {})
        step = torch.compile(step, backend=backend, dynamic=True, fullgraph=True, **options)
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config().vocab_size

    def prompt():
        length = int(torch.randint(low, high, (1,), generator=generator))
        return torch.randint(vocab, (length,), generator=generator).to(DEVICE)

    def run(prompts, row):
        decode = GraphStep(step, len(prompts), DEVICE) if graph else step
        return generate(step, decode, cache, prompts, STEPS, watch=row)

    probe = prompt()
    alone = run([probe], 0)
    batched = {}
    for batch in BATCH_SIZES:
        prompts = [prompt() for _ in range(batch)]
        row = int(torch.randint(batch, (1,), generator=generator))
        prompts[row] = probe
        batched[batch] = run(prompts, row).watched
    mismatches = {batch: torch.nonzero((logits != alone.watched).any(-1)).flatten().tolist()
                  for batch, logits in batched.items()}
    first = batched[BATCH_SIZES[0]]
    return ProbeRuns(alone.watched, torch.cat([probe, alone.tokens[0, :-1]]), mismatches,
                     all(torch.equal(logits, first) for logits in batched.values()))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


@torch.no_grad()
def test_dispatcher_override_routes_out_forms_and_restores_stock_kernels():
    """mm/addmm/bmm .out (what compiled code calls) go to the bi kernels: a row alone equals the row in a batch
    of 64 bitwise, where cuBLAS differs (K = N = 4096 from M = 32 on, measured); leaving the block restores aten."""
    a = torch.randn(64, 4096, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(4096, 4096, device=DEVICE, dtype=torch.bfloat16) / 64
    bias = torch.randn(4096, device=DEVICE, dtype=torch.bfloat16)

    def products():
        out = [torch.empty(0, device=DEVICE, dtype=torch.bfloat16) for _ in range(6)]
        torch.mm(a, w.t(), out=out[0])
        torch.mm(a[:1], w.t(), out=out[1])
        torch.addmm(bias, a, w.t(), out=out[2])
        torch.addmm(bias, a[:1], w.t(), out=out[3])
        torch.bmm(a[None], w.t()[None], out=out[4])
        torch.bmm(a[None, :1], w.t()[None], out=out[5])
        return [out[0][:1], out[1]], [out[2][:1], out[3]], [out[4][0, :1], out[5][0]]

    with batch_invariant_override():
        for batched, alone in products():
            assert torch.equal(batched, alone)
        assert torch.equal(torch.ones(3, 4, device=DEVICE, dtype=torch.int32).sum(1), torch.full((3,), 4, device=DEVICE))
    stock = products()
    assert any(not torch.equal(batched, alone) for batched, alone in stock)  # aten's cuBLAS kernels are back


@torch.no_grad()
def test_dispatcher_override_makes_eager_llama_invariant(models):
    """The baseline of benchmarks/decode.py: stock eager differs on Llama 3; under the override, eager and its
    CUDA-graph capture are bitwise invariant."""
    model, lengths = models("llama-3.1-8b"), MODELS["llama-3.1-8b"].prompt_lengths
    stock = probe_runs(model, lengths, None, graph=False).mismatches
    assert any(stock.values()), stock
    with batch_invariant_override():
        eager = probe_runs(model, lengths, None, graph=False).mismatches
        graphed = probe_runs(model, lengths, None, graph=True).mismatches
    assert eager == graphed == {batch: [] for batch in BATCH_SIZES}


# Both ways the compiled code reaches the bi kernels: op calls (the default), and their launches emitted by Inductor
# (design.md, pass 6), which the CUDA graph then captures. `-k native_launch` picks the latter.
LAUNCHES = [pytest.param(False, id="op_calls"), pytest.param(True, id="native_launch")]


@pytest.mark.parametrize("native_launch", LAUNCHES)
@pytest.mark.parametrize("name", list(MODELS))
@torch.no_grad()
def test_bi_ascend_graph_decode_is_bitwise_batch_invariant(models, name, native_launch):
    model = models(name)
    bi_compile.clear_reports()
    runs = probe_runs(model, MODELS[name].prompt_lengths, "bi_ascend", native_launch=native_launch)
    # batches_agree tells a row-dependent kernel (False) from a batch-1 graph that computes differently from the
    # shared batch >= 2 graph (True: Dynamo specialises batch 1, so two compiled graphs are compared).
    assert runs.mismatches == {batch: [] for batch in BATCH_SIZES}, f"batches agree: {runs.batches_agree}"

    report = bi_compile.passes.Report.merge(bi_compile.reports())
    assert report.invariant  # strict mode would have raised already; this names the contract
    assert any(r.endswith("-> bi.attention") for r in report.rewrites)
    assert any(r.endswith(("-> bi.linear", "-> bi.addmm")) for r in report.rewrites)  # GPT-2's Conv1D: bi.addmm
    if name in LAYER_NORM_FAMILIES:
        assert "aten.native_layer_norm.default -> bi.layer_norm" in report.rewrites
    assert bool(report.native_launches) == native_launch, report.native_launches
    # Invariant and right: the logits match a stock eager forward over the whole generated sequence.
    prompt_length = len(runs.sequence) - STEPS + 1
    expected = model(runs.sequence[None]).logits[0, prompt_length - 1:]
    assert torch.isfinite(runs.alone).all() and relative_error(runs.alone, expected) < MODELS[name].tolerance


@torch.no_grad()
def test_control_stock_inductor_graph_decode_is_not_batch_invariant(models):
    """The check above can fail: stock Inductor (cuBLAS mm, stock SDPA and reductions) differs on Llama 3."""
    mismatches = probe_runs(models("llama-3.1-8b"), MODELS["llama-3.1-8b"].prompt_lengths, "inductor").mismatches
    assert any(mismatches.values()), mismatches
