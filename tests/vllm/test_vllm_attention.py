"""bi-compile's attention backend (BI_ATTN) and platform through vLLM's own types, probed without an engine in a child
process (attention_probe.py): selection, refusals by name, and a decode + prefill-chunk step through the metadata
builder, the KV-cache write and forward against float64."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_vllm_plugin import child_env

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def probe() -> dict:
    completed = subprocess.run([sys.executable, str(HERE / "attention_probe.py")], capture_output=True, text=True,
                               env=child_env(), timeout=300)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("PROBE ")]
    assert completed.returncode == 0 and lines, completed.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("PROBE "))


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
