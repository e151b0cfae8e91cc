"""How vLLM takes bi-compile's piecewise pass, and what the plugin does, probed in child processes (plugin_probe.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("BI_COMPILE_VLLM", "TRITON_INTERPRET")}


def probe_facts(script: str, timeout_s: float = 300) -> dict:
    """The facts a probe script of this folder prints (its last ``PROBE {json}`` line), run in a fresh process."""
    completed = subprocess.run([sys.executable, str(HERE / script)], capture_output=True, text=True, env=child_env(),
                               timeout=timeout_s)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("PROBE ")]
    assert completed.returncode == 0 and lines, completed.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("PROBE "))


@pytest.fixture(scope="module")
def probe() -> dict:
    return probe_facts("plugin_probe.py")


def test_import_bi_compile_does_not_import_vllm():
    code = "import sys, bi_compile; print('vllm' in sys.modules)"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(),
                               timeout=120)
    assert completed.stdout.strip() == "False", completed.stderr[-3000:]


def test_vllm_keeps_the_piecewise_pass_as_a_vllm_inductor_pass_with_the_pipelines_uuid(probe):
    # Anything else vLLM wraps in CallableInductorPass, whose uuid misses changes to the pass files.
    assert probe["resolved_class"] == "VllmBatchInvariantPass"
    assert probe["resolved_is_vllm_inductor_pass"] and probe["resolved_is_pipeline"]
    assert probe["resolved_uuid_is_pipeline_uuid"]
    # vLLM ships its config, pass included, to the engine and worker processes by pickle.
    assert probe["pickle_round_trip_class"] == "VllmBatchInvariantPass"


def test_plugin_is_inert_when_switched_off(probe):
    assert probe["off_pins_set"] == []
    assert probe["off_pre_pass"] == "None"


def test_plugin_refuses_a_conflicting_setting_by_name(probe):
    assert "VLLM_USE_AOT_COMPILE=1" in probe["conflict_error"]


def test_plugin_refuses_vllms_own_batch_invariant_mode_beside_it(probe):
    """BI_COMPILE_VLLM=1 owns the linear layers, lm_head and sampler; VLLM_BATCH_INVARIANT=1 would hand them to
    vLLM's mode. Refused (not warned): a run that mixes the two would measure neither."""
    assert "VLLM_BATCH_INVARIANT=1 (needs 0: vLLM's own batch-invariant mode" in probe["batch_invariant_error"]


def test_plugin_switched_on_pins_the_environment_and_wires_the_pipeline(probe):
    assert probe["on_pins"] == {"VLLM_USE_AOT_COMPILE": "0", "VLLM_BATCH_INVARIANT": "0",
                                "VLLM_USE_V2_MODEL_RUNNER": "0"}
    assert probe["on_pre_pass"] == "DefaultRoutePass"


def test_config_check_names_each_breaking_setting(probe):
    # The probe's process runs on vLLM's own CpuPlatform (its platform was picked with the switch off): that is the
    # first problem of both configs; a default config has no other.
    problems = probe["breaking_config_problems"]
    assert len(problems) == 4 and "not bi-compile's platform" in problems[0]
    assert "FLASHINFER" in problems[1] and "fuse_allreduce_rms" in problems[2] and "'eager'" in problems[3]
    default = probe["default_config_problems"]
    assert len(default) == 2 and "not bi-compile's platform" in default[0] and "attention backend None" in default[1]
