"""bi-compile's attention backend (BI_ATTN) and platform through vLLM's own types, probed without an engine in a child
process (attention_probe.py): selection, refusals by name, a decode + prefill-chunk step through the metadata
builder, the KV-cache write and forward against float64, and what a uniform decode step hands the op (the bounds a
CUDA graph needs)."""

from __future__ import annotations


import pytest
from test_vllm_plugin import probe_facts


@pytest.fixture(scope="module")
def probe() -> dict:
    return probe_facts("attention_probe.py")


def test_platform_plugin_activates_only_when_switched_on(probe):
    assert probe["off_platform"] is None
    assert probe["on_platform"] == "bi_compile.vllm_platform.BiCpuPlatform"


def test_platform_selects_bi_attention_and_refuses_a_named_backend_by_name(probe):
    assert probe["selected"] == "CUSTOM"
    assert "--attention-backend FLASH_ATTN" in probe["named_error"] and "BI_ATTN" in probe["named_error"]
    # CpuPlatform alone returns CPU_ATTN whatever is selected; ours honours CUSTOM and leaves the rest to vLLM.
    assert probe["custom_path"] == "bi_compile.vllm_attention.BiAttentionBackend"
    assert probe["unselected_path"].endswith("CPUAttentionBackend")
    assert probe["same_class"]


def test_unsupported_attention_is_refused_by_name(probe):
    assert "head_size not supported" in probe["refused_head_size"]
    assert "sliding window 128" in probe["refused_features"] and "soft cap 30.0" in probe["refused_features"]


def test_a_step_through_the_backend_matches_float64(probe):
    assert probe["round_trip_max_error"] < 1e-5
    assert probe["padding_row_untouched"]


def test_the_kv_cache_write_fills_the_requests_slots_and_skips_padding(probe):
    """bi::write_kv_cache: every slot of the two requests holds its key and value (the reference test reads them
    back), and the padding token (slot -1) wrote nothing, not even into vLLM's null block 0."""
    assert probe["written_slots"] == probe["request_slots"]
    assert len(probe["written_slots"]) == 40 + 21


def test_uniform_decode_step_passes_static_bounds_and_other_steps_their_own(probe):
    """A decode step's graph is captured once and replayed for every batch of its size: the op's bounds must not
    follow the step (max_query_len 1, max_seq_len the model's max_model_len, 2048 here); a mixed step keeps its own
    (5 and 40). The bounds size the GPU kernel's grid only: the same bits either way, and the same as the mixed
    step's rows for the same tokens."""
    assert probe["decode_step_bounds"] == [1, 2048]
    assert probe["mixed_step_bounds"] == [5, 40]
    assert probe["decode_static_bounds_same_bits"] and probe["decode_matches_mixed_step"]


def test_builder_declares_decode_cuda_graphs_on_a_gpu_only_and_refuses_dcp(probe):
    # UNIFORM_SINGLE_TOKEN_DECODE keeps FULL_DECODE_ONLY (vLLM would turn it to NONE for NEVER).
    assert probe["cudagraph_support_gpu"] == "UNIFORM_SINGLE_TOKEN_DECODE"
    assert probe["cudagraph_support_here"] == "NEVER"
    assert "--decode-context-parallel-size" in probe["dcp_error"] and probe["impl_supports_dcp"] is False
