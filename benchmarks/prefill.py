"""Compiled prefill outside CUDA graphs: what the bi ops' host-side cost adds to time-to-first-token.

vLLM's FULL_DECODE_ONLY captures decode steps only, so every prefill runs the compiled graph op by op from the
host. This measures that, side by side in one run: a transformers Qwen3 built from its config with random bf16
weights (no download, ``benchmarks/decode.py``'s builder), one forward over the prompt (no KV cache), compiled with
``dynamic=True`` by stock Inductor, by ``bi_ascend`` and by ``bi_ascend`` with ``native_launch`` (the bi kernels'
launches in Inductor's generated code). For each batch x tokens point:

- *wall ms*: the median wall time of a call, host and GPU (synchronised after each call): what a prefill step
  outside a CUDA graph costs;
- *graph ms*: the same compiled call captured in a CUDA graph and replayed (CUDA events): the kernels alone;
- *host ms*: wall - graph, the part launches and Python add;
- *first call s*: the point's first call, the compile where it needs a graph of its own (a batch of 1 does: Dynamo
  specialises a dimension of size 1), else a few milliseconds. ``gpu_run.sh prefill`` fills Inductor's cache in a
  process per variant first, so in its table this is the cache load; the compile times are in those processes'
  logs.

and, for eager use, the per-call cost of ``torch.ops.bi.linear`` against ``F.linear`` at M = 1, 1024 -> 3072 (and
``bi.rms_norm`` against ``F.rms_norm``), timed as back-to-back calls with one synchronisation, where the host is
the bottleneck. Targets (docs/benchmarks.md, "Prefill outside CUDA graphs"): bi_ascend wall <= 1.10x Inductor at
every point; eager ``bi.linear`` <= 20 us.

    python benchmarks/prefill.py --markdown out.md --json out.json
    python benchmarks/prefill.py --layers 12 --points 1x16 4x512
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bi_compile  # noqa: E402
import bi_compile.backend  # noqa: E402,F401  (registers bi_ascend where no entry point does: a source tree)
from benchmarks.decode import DTYPES, QWEN3_SHAPES, build_causal_lm, environment, qwen3_config  # noqa: E402

# Each variant: (torch.compile backend, its options). bi_ascend+native: the bi kernels' launches in Inductor's code
# (passes/native_launch.py, the backend option native_launch) instead of op calls.
VARIANTS = {"inductor": ("inductor", None), "bi_ascend": ("bi_ascend", None),
            "bi_ascend+native": ("bi_ascend", {"native_launch": True})}
BACKENDS = tuple(VARIANTS)
WALL_TARGET = 1.10  # bi_ascend / inductor wall time, every point
EAGER_LINEAR_TARGET_US = 20.0


@dataclass
class Point:
    backend: str
    batch: int
    tokens: int
    wall_ms: float
    graph_ms: float
    first_s: float

    @property
    def host_ms(self) -> float:
        return self.wall_ms - self.graph_ms


def parse_point(text: str) -> tuple[int, int]:
    batch, _, tokens = text.partition("x")
    try:
        point = int(batch), int(tokens)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a point is BATCHxTOKENS, e.g. 4x512 (got {text!r})") from None
    if min(point) < 1:
        raise argparse.ArgumentTypeError(f"batch and tokens must be >= 1 (got {text!r})")
    return point


def median_wall_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def median_graph_ms(fn: Callable[[], object], repeats: int) -> float:
    """The call captured once in a CUDA graph, replayed ``repeats`` times, each timed with CUDA events."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # a warm-up on the side stream, as torch.cuda.graph expects
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times)


def run_backend(model, variant: str, points: Sequence[tuple[int, int]], vocab: int, repeats: int) -> list[Point]:
    torch._dynamo.reset()
    backend, options = VARIANTS[variant]
    compiled = torch.compile(model, backend=backend, dynamic=True, options=options)
    results = []
    for batch, tokens in points:
        ids = torch.randint(0, vocab, (batch, tokens), device="cuda", generator=torch.Generator("cuda").manual_seed(batch * tokens))

        def forward():
            return compiled(input_ids=ids, use_cache=False).logits

        with torch.inference_mode():
            first_s = median_wall_ms(forward, 1) / 1e3  # a compile where the point needs a graph of its own
            for _ in range(2):  # warm the caches
                forward()
            wall = median_wall_ms(forward, repeats)
            graph = median_graph_ms(forward, repeats)
        results.append(Point(variant, batch, tokens, wall, graph, first_s))
        print(f"{variant:>16} {batch}x{tokens}: first call {first_s:.1f} s, wall {wall:.2f} ms, "
              f"in a CUDA graph {graph:.2f} ms", flush=True)
    return results


def per_call_us(fn: Callable[[], object], calls: int = 500, repeats: int = 7) -> float:
    """Median over ``repeats`` of the mean time per call of ``calls`` back-to-back calls (one sync at the end)."""
    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e6 / calls)
    return statistics.median(samples)


def eager_overheads(dtype: torch.dtype) -> dict[str, float]:
    """Per-call microseconds of small eager calls, where launch cost is all there is to time."""
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, 1024, device="cuda", dtype=dtype, generator=g)
    weight = torch.randn(3072, 1024, device="cuda", dtype=dtype, generator=g)
    norm_weight = torch.randn(1024, device="cuda", dtype=dtype, generator=g)
    with torch.inference_mode():
        return {
            "bi.linear M=1 1024->3072": per_call_us(lambda: torch.ops.bi.linear(x, weight)),
            "F.linear M=1 1024->3072": per_call_us(lambda: F.linear(x, weight)),
            "bi.rms_norm M=1 1024": per_call_us(lambda: torch.ops.bi.rms_norm(x, norm_weight, 1e-6)),
            "F.rms_norm M=1 1024": per_call_us(lambda: F.rms_norm(x, (1024,), norm_weight, 1e-6)),
            # What a compiled Qwen3 graph calls for each RMSNorm's variance, against the same in aten.
            "bi.mean_square M=1 1024": per_call_us(lambda: torch.ops.bi.mean_square(x, [-1], True)),
            "aten mean of squares M=1 1024": per_call_us(lambda: x.float().pow(2).mean(-1, keepdim=True)),
        }


def linear_host_layers(dtype: torch.dtype) -> dict[str, float]:
    """Per-call microseconds of each layer an eager ``bi.linear`` call passes through, outermost first, so that the
    difference between two rows is what that layer adds (M = 1, 1024 -> 3072)."""
    from bi_compile.kernels import matmul as matmul_kernels
    from bi_compile.ops import matmul as matmul_ops

    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, 1024, device="cuda", dtype=dtype, generator=g)
    weight = torch.randn(3072, 1024, device="cuda", dtype=dtype, generator=g)
    plan = matmul_ops._linear_plan(x, weight, None)
    with torch.inference_mode():
        return {
            "torch.ops.bi.linear.default (what compiled code calls)": per_call_us(lambda: torch.ops.bi.linear.default(x, weight)),
            "the CUDA kernel function, no dispatcher": per_call_us(lambda: matmul_ops._linear_triton(x, weight)),
            "kernels.launch_linear, its plan made (no checks or planning)":
                per_call_us(lambda: matmul_kernels.launch_linear(plan, x, weight, None)),
            "torch.empty of the output": per_call_us(lambda: torch.empty((1, 1, 3072), device="cuda", dtype=dtype)),
        }


def profile_compiled_call(model, vocab: int, path: Path, point: tuple[int, int] = (1, 16), calls: int = 20) -> None:
    """cProfile of ``calls`` compiled bi_ascend forwards at ``point`` (after warm-up), the top functions by own time
    written to ``path``: where a compiled prefill's host time goes."""
    import cProfile
    import io
    import pstats

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="bi_ascend", dynamic=True)
    ids = torch.randint(0, vocab, point, device="cuda")
    with torch.inference_mode():
        for _ in range(3):
            compiled(input_ids=ids, use_cache=False)
        torch.cuda.synchronize()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            compiled(input_ids=ids, use_cache=False)
        torch.cuda.synchronize()
        profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(40)
    path.write_text(f"{calls} compiled bi_ascend forwards at {point[0]}x{point[1]}\n{text.getvalue()}")


def markdown(env: str, title: str, points: Sequence[Point], eager: dict[str, float]) -> str:
    by_key = {(p.backend, p.batch, p.tokens): p for p in points}
    lines = [f"### {title}", "", env, "",
             "| batch x tokens | variant | Inductor wall ms | its wall ms | wall ratio | Inductor graph ms | "
             "its graph ms | graph ratio | Inductor host ms | its host ms | Inductor first call s | its first call s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    met: dict[str, list[bool]] = {}
    for batch, tokens in dict.fromkeys((p.batch, p.tokens) for p in points):
        stock = by_key.get(("inductor", batch, tokens))
        for variant in BACKENDS[1:]:
            bi = by_key.get((variant, batch, tokens))
            if stock is None or bi is None:
                continue
            ratio = bi.wall_ms / stock.wall_ms
            met.setdefault(variant, []).append(ratio <= WALL_TARGET)
            lines.append(f"| {batch} x {tokens} | {variant} | {stock.wall_ms:.2f} | {bi.wall_ms:.2f} | {ratio:.2f} | "
                         f"{stock.graph_ms:.2f} | {bi.graph_ms:.2f} | {bi.graph_ms / stock.graph_ms:.2f} | "
                         f"{stock.host_ms:.2f} | {bi.host_ms:.2f} | {stock.first_s:.1f} | {bi.first_s:.1f} |")
    lines.append("")
    lines += [f"target: {variant} wall <= {WALL_TARGET:.2f}x Inductor; met at {sum(ok)} of {len(ok)} points"
              for variant, ok in met.items()]
    lines += ["", "| eager call | us per call |", "|---|---:|"]
    lines += [f"| {name} | {us:.1f} |" for name, us in eager.items()]
    linear = eager.get("bi.linear M=1 1024->3072")
    if linear is not None:
        lines += ["", f"target: eager bi.linear <= {EAGER_LINEAR_TARGET_US:.0f} us; "
                      f"{'met' if linear <= EAGER_LINEAR_TARGET_US else 'not met'} ({linear:.1f} us)"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> list[Point]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(QWEN3_SHAPES), default="qwen3-0.6b")
    parser.add_argument("--layers", type=int, help="override the number of decoder layers (default: the model's)")
    parser.add_argument("--points", nargs="+", type=parse_point, default=[(1, 16), (1, 512), (4, 512), (1, 2048)],
                        help="batch x tokens, e.g. 1x16 4x512")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--markdown", type=Path, help="append the tables to this file")
    parser.add_argument("--json", type=Path, help="write the results to this file")
    parser.add_argument("--profile", type=Path, help="write the host-side layers of an eager bi.linear call and a "
                        "cProfile of compiled bi_ascend forwards at 1x16 to this file, and measure nothing else")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    device = torch.device("cuda")
    env = environment(device)
    print(env, flush=True)
    config = qwen3_config(args.model, args.layers)
    if args.profile:
        layers = eager_overheads(DTYPES[args.dtype]) | linear_host_layers(DTYPES[args.dtype])
        for name, us in layers.items():
            print(f"{name}: {us:.1f} us per call", flush=True)
        model = build_causal_lm(config, device=device, dtype=DTYPES[args.dtype])
        profile_compiled_call(model, config.vocab_size, args.profile)
        with args.profile.open("a") as f:
            f.write("\n" + "\n".join(f"{us:8.1f} us  {name}" for name, us in layers.items()) + "\n")
        return []
    eager = eager_overheads(DTYPES[args.dtype])  # first: seconds, where the compiles below take minutes
    for name, us in eager.items():
        print(f"eager {name}: {us:.1f} us per call", flush=True)
    model = build_causal_lm(config, device=device, dtype=DTYPES[args.dtype])
    points = []
    for backend in args.backends:
        points += run_backend(model, backend, args.points, config.vocab_size, args.repeats)
    title = f"Prefill outside CUDA graphs: {args.model}, {config.num_hidden_layers} layers, {args.dtype}"
    text = markdown(env, title, points, eager)
    print(text)
    if args.markdown:
        with args.markdown.open("a") as f:
            f.write(text + "\n")
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "title": title, "eager_us": eager,
                                         "points": [asdict(p) | {"host_ms": p.host_ms} for p in points]}, indent=1))
    return points


if __name__ == "__main__":
    main()
