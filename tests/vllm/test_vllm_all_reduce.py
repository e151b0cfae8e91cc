"""The table row for vLLM's ``vllm.all_reduce`` (as vLLM's GroupCoordinator calls it in captured graphs on CUDA, ROCm
and XPU), probed in a child process with vLLM's own parallel groups (all_reduce_probe.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def probe() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("BI_COMPILE_VLLM", "TRITON_INTERPRET")}
    completed = subprocess.run([sys.executable, str(HERE / "all_reduce_probe.py")], capture_output=True, text=True,
                               env=env, timeout=300)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("PROBE ")]
    assert completed.returncode == 0 and lines, completed.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("PROBE "))


def test_vllm_all_reduce_becomes_bi_all_reduce_on_the_groups_torch_process_group(probe):
    assert probe["rewrites"] == {"vllm.all_reduce.default -> bi.all_reduce": 1}
    # vLLM names its GroupCoordinator ("tp:0"); bi.all_reduce gets the torch.distributed group under it.
    assert probe["vllm_group"] == "tp:0"
    assert probe["bi_group_names"] == [probe["torch_group"]]
    assert probe["output_is_input_doubled_plus_one"]  # one rank: the sum is the input


def test_a_group_vllm_does_not_know_is_left_and_reported_variant_with_its_line(probe):
    assert probe["unknown_group_rewrites"] == {}
    ((target, kind, source),) = probe["unknown_group_findings"]
    assert (target, kind) == ("vllm.all_reduce.default", "variant")
    assert "all_reduce_probe.py" in source and 'group_name="tp:999"' in source
