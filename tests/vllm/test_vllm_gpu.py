"""The seed tests through real vLLM on a CUDA GPU, for both bi routes, with stock vLLM as the control and vLLM's own
``VLLM_BATCH_INVARIANT=1`` recorded beside them.

Qwen3-0.6B's shapes with all 28 layers and random bf16 weights, built on the GPU (``checkpoint.py``); prefill
chunks of ``CHUNK_TOKENS``; vLLM's default CUDA-graph capture sizes. Every route's engine starts at once in its own
process (``conftest.gpu_results``), so the whole suite costs about one engine start. Ran on the H200 with vLLM
0.26.0 from the offline bundle (docs/vllm.md, "On a GPU" says how):

    PYTHONPATH=/path/to/vllm-site BI_COMPILE_VLLM_GPU_OUT=out/vllm-gpu VLLM_USE_FLASHINFER_SAMPLER=0 \
        python -m pytest -m gpu tests/vllm/test_vllm_gpu.py
"""

from __future__ import annotations

import pytest
from workloads import (CHUNK_TOKENS, alone_batched_differences, assert_alone_batched_invariant,
                       assert_needle_invariant, needle_mismatches)

pytestmark = pytest.mark.gpu

BI_ROUTES = ("bi-graph", "bi-piecewise")
# What vLLM must really have run for each bi route (after its own config checks): mode, the CUDA-graph mode, and
# whether its attention op is inside the graphs the pass sees (mode 3 splits the graph at attention: the pieces
# between the attention calls reach the pass, the attention runs between them).
EXPECTED_COMPILATION = {
    "bi-graph": ("DYNAMO_TRACE_ONCE", "FULL_DECODE_ONLY", True),
    "bi-piecewise": ("VLLM_COMPILE", "PIECEWISE", False),
}


@pytest.mark.parametrize("route", BI_ROUTES)
def test_gpu_needle_alone_and_in_random_batches_gives_the_same_tokens(route, gpu_results):
    assert_needle_invariant(gpu_results(route))


@pytest.mark.parametrize("route", BI_ROUTES)
def test_gpu_logprobs_alone_and_batched_are_bitwise_equal(route, gpu_results):
    assert_alone_batched_invariant(gpu_results(route)["logprobs"])


@pytest.mark.parametrize("route", BI_ROUTES)
def test_gpu_chunked_prefill_logprobs_are_bitwise_equal(route, gpu_results):
    chunked = gpu_results(route)["chunked"]
    assert sum(tokens > CHUNK_TOKENS for tokens in chunked["prompt_tokens"]) >= 2  # really split, alone too
    assert_alone_batched_invariant(chunked)


def test_gpu_control_stock_vllm_changes_with_the_batch(gpu_results):
    result = gpu_results("stock")
    found = (needle_mismatches(result) + alone_batched_differences(result["logprobs"])
             + alone_batched_differences(result["chunked"]))
    assert found != []


@pytest.mark.parametrize("route", BI_ROUTES)
def test_gpu_vllm_ran_the_route_in_graph_mode_with_the_pass(route, gpu_results):
    result = gpu_results(route)
    mode, cudagraph_mode, attention_in_graph = EXPECTED_COMPILATION[route]
    assert result["compilation"]["mode"] == mode
    assert cudagraph_mode in result["compilation"]["cudagraph_mode"]
    assert set(result["attention_backends"]) == {"CUSTOM"}, result["attention_backends"]  # BI_ATTN, bi_compile.vllm_platform
    # Captured at start-up, and replayed by the workloads' decode steps.
    assert result["cuda_graphs_at_start"]["captures"] > 0
    assert result["cuda_graphs"]["replays"] > result["cuda_graphs_at_start"]["replays"]
    # The pass audited and rewrote the model's graphs; where vLLM's attention is in them, the audit names it.
    assert result["reports"] and all(sum(report["counts"].values()) > 0 for report in result["reports"])
    assert sum(sum(report["rewrites"].values()) for report in result["reports"]) > 0
    unknown = {f["target"] for report in result["reports"] for f in report["findings"]}
    assert any("unified_attention" in target for target in unknown) == attention_in_graph


def test_gpu_vllm_batch_invariant_mode_ran_and_says_how(gpu_results):
    """vLLM's own mode is measured beside the bi routes, not held to invariance here: its result (mode, CUDA-graph
    mode, attention backend, differences) goes to docs/vllm.md from the JSON that the suite writes."""
    result = gpu_results("vllm-bi")
    assert result["switches"]["VLLM_BATCH_INVARIANT"] == "1"
    assert result["reports"] == []  # no bi pass on this route
