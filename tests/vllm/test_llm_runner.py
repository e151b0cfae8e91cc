"""The parts of llm_runner.py (the GPU suite's and the profile stage's engine runner) that need no engine."""

from __future__ import annotations

import torch
from llm_runner import PROFILE_TOKENS, profile_steps


def test_profile_runs_once_untimed_then_ranks_the_kernels_of_the_profiled_run_by_their_own_time():
    calls = []
    x = torch.randn(64, 64)

    def run():
        calls.append(1)
        (x @ x).relu()

    profile = profile_steps(run)
    assert len(calls) == 2 and profile["device"] == ("GPU" if torch.cuda.is_available() else "CPU")
    names = [k["name"] for k in profile["kernels"]]
    assert "aten::mm" in names and profile["decode_steps"] == PROFILE_TOKENS
    times = [k["us"] for k in profile["kernels"]]
    # Each row and the total are rounded to whole µs: the rows may sum to half a µs each above the total.
    assert times == sorted(times, reverse=True) and sum(times) <= profile["total_us"] + len(times) / 2
