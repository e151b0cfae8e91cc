"""The seed tests through real vLLM on a CUDA GPU, for both bi routes, with stock vLLM as the control and vLLM's own
``VLLM_BATCH_INVARIANT=1`` (without bi-compile) recorded beside them as a comparison route.

The bi routes run without ``VLLM_BATCH_INVARIANT`` (the plugin pins it to 0): bi-compile owns the attention
(BI_ATTN), the linear layers (the pass, ``mm -> bi.linear``), the lm_head and the sampler (``BiGPUWorker``), and the
tests check from the engine's own counts (``bi_compile.vllm_checks.RAN``) that each of them ran.

Qwen3-0.6B's shapes with all 28 layers and random bf16 weights, built on the GPU (``checkpoint.py``); prefill
chunks of ``CHUNK_TOKENS``; vLLM's default CUDA-graph capture sizes. Every route's engine starts at once in its own
process (``conftest.gpu_results``), so the whole suite costs about one engine start. Runs on the H200 with vLLM
0.26.0 from the offline bundle (docs/vllm.md, "On a GPU" says how):

    PYTHONPATH=/path/to/vllm-site BI_COMPILE_VLLM_GPU_OUT=out/vllm-gpu VLLM_USE_FLASHINFER_SAMPLER=0 \
        python -m pytest -m gpu tests/vllm/test_vllm_gpu.py
"""

from __future__ import annotations

import pytest
from workloads import (CHUNK_TOKENS, CHUNKED_PROMPTS, LOGPROB_PROMPTS, LOGPROB_SAMPLING, NEEDLE_SAMPLING, NEEDLE_TRIALS,
                       SAMPLED_PROMPTS, SAMPLED_SAMPLING, alone_batched_differences, assert_alone_batched_invariant,
                       assert_needle_invariant, needle_mismatches, rewrite_counts)

pytestmark = pytest.mark.gpu

BI_ROUTES = ("bi-graph", "bi-piecewise")
# What vLLM must really have run for each bi route (after its own config checks): mode, the CUDA-graph mode, and
# whether its attention op is inside the graphs the pass sees (mode 3 splits the graph at attention: the pieces
# between the attention calls reach the pass, the attention runs between them). BI_ATTN declares full CUDA graphs
# for uniform decode steps, so FULL_DECODE_ONLY stays (vLLM would drop it to NONE for a backend without support),
# and the piecewise route keeps vLLM's FULL_AND_PIECEWISE.
EXPECTED_COMPILATION = {
    "bi-graph": ("DYNAMO_TRACE_ONCE", "FULL_DECODE_ONLY", True),
    "bi-piecewise": ("VLLM_COMPILE", "FULL_AND_PIECEWISE", False),
}


def sampling_steps() -> tuple[int, int, int]:
    """Steps of a GPU run that go through the lm_head and the sampler (one per generated token of a request's
    batch; a chunked prompt's earlier chunks add more): all of them, those with a temperature (each asks for
    logprobs), and those with top-k and top-p on."""
    needle = NEEDLE_SAMPLING["max_tokens"] * (1 + NEEDLE_TRIALS)
    logprobs = LOGPROB_SAMPLING["max_tokens"] * (LOGPROB_PROMPTS + 1)
    sampled = SAMPLED_SAMPLING["max_tokens"] * (SAMPLED_PROMPTS + 1)
    chunked = LOGPROB_SAMPLING["max_tokens"] * (CHUNKED_PROMPTS + 1)
    return needle + logprobs + sampled + chunked, logprobs + sampled + chunked, sampled


@pytest.mark.parametrize("route", BI_ROUTES)
def test_gpu_needle_alone_and_in_random_batches_gives_the_same_tokens(route, gpu_results):
    assert_needle_invariant(gpu_results(route))


@pytest.mark.parametrize("route", BI_ROUTES)
def test_gpu_logprobs_alone_and_batched_are_bitwise_equal(route, gpu_results):
    assert_alone_batched_invariant(gpu_results(route)["logprobs"])


@pytest.mark.parametrize("route", BI_ROUTES)
def test_gpu_top_k_top_p_samples_and_logprobs_alone_and_batched_are_bitwise_equal(route, gpu_results):
    assert_alone_batched_invariant(gpu_results(route)["sampled"])


@pytest.mark.parametrize("route", BI_ROUTES)
def test_gpu_chunked_prefill_logprobs_are_bitwise_equal(route, gpu_results):
    chunked = gpu_results(route)["chunked"]
    assert sum(tokens > CHUNK_TOKENS for tokens in chunked["prompt_tokens"]) >= 2  # really split, alone too
    assert_alone_batched_invariant(chunked)


def test_gpu_control_stock_vllm_changes_with_the_batch(gpu_results):
    result = gpu_results("stock")
    found = (needle_mismatches(result) + alone_batched_differences(result["logprobs"])
             + alone_batched_differences(result["sampled"]) + alone_batched_differences(result["chunked"]))
    assert found != []


@pytest.mark.parametrize("route", BI_ROUTES)
def test_gpu_vllm_ran_the_route_in_graph_mode_with_the_pass(route, gpu_results):
    result = gpu_results(route)
    mode, cudagraph_mode, attention_in_graph = EXPECTED_COMPILATION[route]
    assert result["compilation"]["mode"] == mode
    assert cudagraph_mode in result["compilation"]["cudagraph_mode"]
    # Captured at start-up, and replayed by the workloads' decode steps.
    assert result["cuda_graphs_at_start"]["captures"] > 0
    assert result["cuda_graphs"]["replays"] > result["cuda_graphs_at_start"]["replays"]
    # The pass audited and rewrote the model's graphs and left nothing unknown: vLLM's rotary, silu_and_mul and
    # KV-cache write have no reduction across tokens, and where its attention op is in the graph it runs BI_ATTN;
    # the audit counts those invariant by construction and says why (passes/audit.py).
    assert result["reports"] and all(sum(report["counts"].values()) > 0 for report in result["reports"])
    assert [f for report in result["reports"] for f in report["findings"]] == []
    declared = {target for report in result["reports"] for target in report["by_construction"]}
    assert any("unified_attention" in target for target in declared) == attention_in_graph


@pytest.mark.parametrize("route", BI_ROUTES)
def test_gpu_linear_layers_reach_the_pass_without_vllms_batch_invariant_mode(route, gpu_results):
    """Without VLLM_BATCH_INVARIANT vLLM's linear layers call F.linear, which reaches the graph as mm and becomes
    bi.linear; vLLM's own Triton matmul and norm kernels (``triton_kernel_wrapper_functional``, 169 of them per
    bi-graph run when the plugin still set VLLM_BATCH_INVARIANT=1) are gone."""
    result = gpu_results(route)
    assert result["switches"]["VLLM_BATCH_INVARIANT"] == "0" and result["switches"]["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert sum(rewrite_counts(result, "aten.mm.default -> bi.linear")) > 0
    unknown = {f["target"] for report in result["reports"] for f in report["findings"]}
    assert not [target for target in unknown if "triton_kernel_wrapper" in target], unknown


@pytest.mark.parametrize("route", BI_ROUTES)
def test_gpu_bi_attention_lm_head_and_sampler_really_ran(route, gpu_results):
    """Call counts from the engine's worker (bi_compile.vllm_checks.RAN). The lm_head and the sampler run eagerly
    every step; BI_ATTN's Python forward runs in every eager or piecewise step and while a graph is captured, not
    when a captured decode graph replays, so its count has no per-step floor."""
    result = gpu_results(route)
    assert result["attention_backends"] == ["CUSTOM"]  # BI_ATTN, bi_compile.vllm_platform
    steps, temperature_steps, top_k_top_p_steps = sampling_steps()
    ran = result["bi_calls"]
    assert ran["BI_ATTN forward"] > 0
    assert ran["lm_head bi.linear"] >= steps
    assert ran["sampler bi.log_softmax"] >= temperature_steps
    # The GPU draw is vLLM's exponential noise over bi.softmax (the Gumbel kernel is the CPU's).
    assert ran["sampler bi.softmax"] >= temperature_steps and ran.get("sampler gumbel draw", 0) == 0
    assert ran["sampler top-k/top-p"] >= top_k_top_p_steps


def test_gpu_vllm_batch_invariant_mode_ran_and_says_how(gpu_results):
    """vLLM's own mode (VLLM_BATCH_INVARIANT=1, no bi-compile) is measured beside the bi routes, not held to
    invariance here: its result (mode, CUDA-graph mode, attention backend, differences) goes to docs/vllm.md from
    the JSON that the suite writes."""
    result = gpu_results("vllm-bi")
    assert result["switches"]["VLLM_BATCH_INVARIANT"] == "1" and result["switches"]["BI_COMPILE_VLLM"] is None
    assert result["reports"] == [] and result["bi_calls"] == {}  # no bi pass, none of bi-compile's pieces


# ---- MoE: Qwen3-30B-A3B's layer shapes (128 experts, top 8), 4 layers, vLLM's Triton fused MoE ----


def test_gpu_moe_logprobs_and_chunked_prefill_alone_and_batched_are_bitwise_equal(gpu_results):
    """Batches of 1..64 requests put M = 1..64 tokens through each MoE layer in decode (M <= 4 takes vLLM's naive
    block assignment, without moe_align_block_size) and up to CHUNK_TOKENS in prefill: one config for all."""
    result = gpu_results("moe-bi-graph")
    assert_needle_invariant(result)
    assert_alone_batched_invariant(result["logprobs"])
    assert_alone_batched_invariant(result["chunked"])


def test_gpu_moe_control_stock_vllm_changes_with_the_batch(gpu_results):
    result = gpu_results("moe-stock")
    assert result["moe_layers"] is None  # stock vLLM's worker: nothing pinned
    found = (needle_mismatches(result) + alone_batched_differences(result["logprobs"])
             + alone_batched_differences(result["chunked"]))
    assert found != []


def test_gpu_moe_layers_were_owned_and_the_audit_counts_them_invariant(gpu_results):
    result = gpu_results("moe-bi-graph")
    layers = result["moe_layers"]
    assert len(layers) == 4 and all(layer["experts"] == 128 and layer["inner"] == 768 for layer in layers)
    assert all(layer["bi_linear"] == ["gate"] for layer in layers)
    assert result["bi_calls"]["moe bi.linear"] > 0  # the gate inside vllm::moe_forward ran bi.linear
    assert [f for report in result["reports"] for f in report["findings"]] == []
    declared = {target for report in result["reports"] for target in report["by_construction"]}
    assert any("moe_forward" in target for target in declared), declared
