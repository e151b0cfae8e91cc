"""Time every bi op against the stock op it replaces, side by side, on one GPU.

    PYTHONPATH=. python benchmarks/kernels.py                       # all ops, bf16, default shapes
    PYTHONPATH=. python benchmarks/kernels.py --ops linear softmax --ms 1 32 --markdown results.md
    PYTHONPATH=. python benchmarks/kernels.py --shapes qwen3-8b --dtype fp16 --cuda-graph
    PYTHONPATH=. python benchmarks/kernels.py --shapes layer-norm --ops layer_norm --ms 256 2048 8192 --cuda-graph

Each time is the median of ``triton.testing.do_bench`` over eager calls (L2 flushed between them, the host's
cost included where it exceeds the GPU's), or with ``--cuda-graph`` the median of
``triton.testing.do_bench_cudagraph`` over back-to-back calls in one CUDA graph on L2-cold inputs (no host
cost): the decode setting, and the kernel's own time. TFLOP/s counts
2*M*N*K for the matmuls; GB/s counts each input read once and each output written once. An op that no
module in ``bi_compile.ops`` registers yet is skipped with a message. To add cases, append a builder to
``CASE_BUILDERS``. Attention cases take M as the batch and stop at 64: ``--ops attention --ms 1 4 16 64``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import pkgutil
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_MS = (1, 8, 32, 128, 512, 2048, 8192)
EPS = 1e-6


@dataclass(frozen=True)
class Shapes:
    matmuls: tuple[tuple[int, int], ...]  # (K, N) of each linear layer
    hiddens: tuple[int, ...]  # widths of the norms and hidden-size reductions
    vocab: int = 151936


PRESETS = {
    # Qwen3-0.6B: q, k/v, o, gate/up, down, lm_head
    "qwen3-0.6b": Shapes(((1024, 2048), (1024, 1024), (2048, 1024), (1024, 3072), (3072, 1024), (1024, 151936)), (1024,)),
    # Qwen3-8B: fused qkv, o, fused gate_up, down, lm_head
    "qwen3-8b": Shapes(((4096, 6144), (4096, 4096), (4096, 24576), (12288, 4096), (4096, 151936)), (4096,)),
    # The hidden sizes of the LayerNorm families, 768 (GPT-2) to 8192; no projections. GPT-2's vocabulary.
    "layer-norm": Shapes((), (768, 1024, 2048, 2560, 4096, 8192), vocab=50257),
}
# Without --shapes: the Qwen3-8B projections, the Qwen3-0.6B lm_head, both hidden sizes.
DEFAULT_SHAPES = Shapes(((4096, 6144), (4096, 4096), (4096, 24576), (12288, 4096), (1024, 151936)), (1024, 4096))


@dataclass(frozen=True)
class Case:
    """One timed comparison: ``inputs(m, dtype)`` builds the arguments that both ``bi`` and ``stock`` take."""

    op: str  # the bi op's name, as in torch.ops.bi.<op>
    label: str
    inputs: Callable[[int, torch.dtype], tuple]
    bi: Callable[..., object]
    stock: Callable[..., object]
    flops: Callable[[int], float] | None = None
    max_m: int | None = None  # the largest M (attention: the batch) this case runs at; None: every --ms value


def _rand(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, device="cuda").to(dtype)


def matmul_cases(shapes: Shapes) -> list[Case]:
    """bi::linear vs F.linear, weight [N, K] read in place by both."""
    def case(k: int, n: int) -> Case:
        return Case(
            "linear", f"{k}->{n}",
            lambda m, dtype: (_rand(m, k, dtype=dtype), _rand(n, k, dtype=dtype) / k**0.5),
            lambda x, w: torch.ops.bi.linear(x, w),
            F.linear,
            lambda m: 2.0 * m * n * k,
        )

    return [case(k, n) for k, n in shapes.matmuls]


def reduction_cases(shapes: Shapes) -> list[Case]:
    """Row-wise reductions over the last dim of [M, width] inputs: norms at the hidden sizes, the rest at the
    hidden sizes and the vocabulary."""
    cases = []
    for width in (*shapes.hiddens, shapes.vocab):
        x = lambda m, dtype, width=width: (_rand(m, width, dtype=dtype),)  # noqa: E731
        if width != shapes.vocab:
            xw = lambda m, dtype, width=width: (_rand(m, width, dtype=dtype), _rand(width, dtype=dtype))  # noqa: E731
            xwx = lambda m, dtype, width=width: (_rand(m, width, dtype=dtype), _rand(width, dtype=dtype), _rand(m, width, dtype=dtype))  # noqa: E731
            xww = lambda m, dtype, width=width: (_rand(m, width, dtype=dtype), _rand(width, dtype=dtype), _rand(width, dtype=dtype))  # noqa: E731
            cases += [
                Case("rms_norm", f"hidden {width}", xw,
                     lambda t, w: torch.ops.bi.rms_norm(t, w, EPS),
                     lambda t, w, width=width: F.rms_norm(t, (width,), w, EPS)),
                Case("add_rms_norm", f"hidden {width}", xwx,
                     lambda a, w, b: torch.ops.bi.add_rms_norm(a, b, w, EPS),
                     lambda a, w, b, width=width: F.rms_norm(a + b, (width,), w, EPS)),
                Case("layer_norm", f"hidden {width}", xww,
                     lambda t, w, b: torch.ops.bi.layer_norm(t, w, b, EPS),
                     lambda t, w, b, width=width: F.layer_norm(t, (width,), w, b, EPS)),
                Case("var_mean", f"hidden {width}", x,
                     lambda t: torch.ops.bi.var_mean(t, [-1]), lambda t: torch.var_mean(t, -1)),
            ]
        cases += [
            Case("softmax", f"width {width}", x, lambda t: torch.ops.bi.softmax(t, -1, False), lambda t: torch.softmax(t, -1)),
            Case("log_softmax", f"width {width}", x,
                 lambda t: torch.ops.bi.log_softmax(t, -1, False), lambda t: torch.log_softmax(t, -1)),
            Case("sum", f"width {width}", x, lambda t: torch.ops.bi.sum(t, [-1]), lambda t: t.sum(-1)),
            Case("mean", f"width {width}", x, lambda t: torch.ops.bi.mean(t, [-1]), lambda t: t.mean(-1)),
            Case("logsumexp", f"width {width}", x, lambda t: torch.ops.bi.logsumexp(t, [-1]), lambda t: t.logsumexp(-1)),
            Case("cumsum", f"width {width}", x, lambda t: torch.ops.bi.cumsum(t, -1), lambda t: t.cumsum(-1)),
        ]
    return cases


# Attention (query heads, kv heads, head dim): Qwen3-8B / Llama-3-8B, Qwen3-1.7B, Gemma-2-9B / Gemma-3-12B.
ATTENTION_HEADS = ((32, 8, 128), (16, 8, 128), (16, 8, 256))
ATTENTION_CONTEXTS = (512, 2048, 8192)
ATTENTION_MAX_BATCH = 64


def attention_cases(shapes: Shapes) -> list[Case]:
    """bi::attention vs F.scaled_dot_product_attention (GQA), M = the batch (1..64): decode (one query over a
    context of S keys) and causal prefill (L = S), no mask, so that stock SDPA takes its flash kernel."""

    def case(heads: int, kv_heads: int, dim: int, context: int, prefill: bool) -> Case:
        q_len = context if prefill else 1
        return Case(
            "attention", f"{'prefill' if prefill else 'decode'} ctx {context} {heads}/{kv_heads}x{dim}",
            lambda m, dtype: (_rand(m, heads, q_len, dim, dtype=dtype), _rand(m, kv_heads, context, dim, dtype=dtype),
                              _rand(m, kv_heads, context, dim, dtype=dtype)),
            lambda q, k, v: torch.ops.bi.attention(q, k, v, is_causal=prefill, enable_gqa=True),
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=prefill, enable_gqa=True),
            lambda m: 4.0 * m * heads * q_len * context * dim / (2 if prefill else 1),  # QK^T and PV; causal: half
            max_m=ATTENTION_MAX_BATCH,
        )

    return [case(*head, context, prefill) for head in ATTENTION_HEADS for prefill in (False, True)
            for context in ATTENTION_CONTEXTS]


# Each builder turns the shapes into cases; to time another op family, append its builder.
CASE_BUILDERS: list[Callable[[Shapes], list[Case]]] = [matmul_cases, reduction_cases, attention_cases]


def selected_shapes(presets: list[str]) -> Shapes:
    if not presets:
        return DEFAULT_SHAPES
    chosen = [PRESETS[p] for p in presets]
    return Shapes(
        tuple(dict.fromkeys(kn for s in chosen for kn in s.matmuls)),
        tuple(dict.fromkeys(h for s in chosen for h in s.hiddens)),
        chosen[0].vocab,
    )


def import_op_modules() -> None:
    """Import every module of bi_compile.ops, so that each registers its torch.ops.bi.* ops."""
    import bi_compile.ops

    for module in pkgutil.iter_modules(bi_compile.ops.__path__):
        try:
            importlib.import_module(f"bi_compile.ops.{module.name}")
        except Exception as error:  # one broken op module must not stop the others' numbers
            print(f"skip module bi_compile.ops.{module.name}: {type(error).__name__}: {error}")


def registered(op: str) -> bool:
    return hasattr(torch.ops.bi, op)


def nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    return 0


# How --cuda-graph times a call, for the headings of every table that uses it.
GRAPH_TIMING = "median of do_bench_cudagraph, back-to-back calls on L2-cold inputs"


def time_us(fn: Callable[..., object], arg_sets: list[tuple], cuda_graph: bool) -> float:
    """Median time of one call of ``fn``: eager calls on ``arg_sets[0]`` (do_bench flushes L2 between them;
    the host's cost shows where it exceeds the GPU's), or calls on each argument set in turn, back to back in
    one CUDA graph (no host cost; the sets together overflow L2, so every call reads its inputs from memory).

    Not do_bench over graph replays: its L2 flush (``zero_`` of 256 MB) leaves L2 full of dirty lines, and
    the first call after it pays for writing them back, up to 50 MB on an H100 (docs/lab-log.md, "How the kernels
    are timed"). Back to back, what a call writes back is what the call before it, the same op, wrote."""
    import triton.testing

    if not cuda_graph:
        return triton.testing.do_bench(lambda: fn(*arg_sets[0]), return_mode="median") * 1e3

    def calls() -> None:
        for args in arg_sets:
            fn(*args)

    return triton.testing.do_bench_cudagraph(calls, return_mode="median") * 1e3 / len(arg_sets)


def graph_sets(args: tuple) -> int:
    """Argument sets per CUDA graph: enough to hold twice the L2 cache."""
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(1, -(-2 * l2 // max(nbytes(args), 1)))


def run(cases: list[Case], ms: list[int], dtype: torch.dtype, cuda_graph: bool) -> list[list[str]]:
    from tqdm import tqdm

    missing = sorted({c.op for c in cases if not registered(c.op)})
    for op in missing:
        print(f"skip bi::{op}: not registered (no module in bi_compile.ops defines it yet)")
    rows = []
    for case in tqdm([c for c in cases if c.op not in missing], desc="cases", leave=False):
        for m in (m for m in ms if case.max_m is None or m <= case.max_m):
            args = case.inputs(m, dtype)
            try:
                io_bytes = nbytes(args) + nbytes(case.bi(*args))
                arg_sets = [args] + [case.inputs(m, dtype) for _ in range(graph_sets(args) - 1)] if cuda_graph else [args]
                bi_us = time_us(case.bi, arg_sets, cuda_graph)
                stock_us = time_us(case.stock, arg_sets, cuda_graph)
            except Exception as error:  # report and go on: one failing op must not cost the other numbers
                print(f"failed bi::{case.op} {case.label} M={m}: {type(error).__name__}: {error}")
                continue
            tflops = lambda us: f"{case.flops(m) / us / 1e6:.1f}" if case.flops else "-"  # noqa: E731
            rows.append([
                f"bi::{case.op}", case.label, str(m),
                f"{bi_us:.1f}", f"{stock_us:.1f}", f"{bi_us / stock_us:.2f}",
                tflops(bi_us), tflops(stock_us),
                f"{io_bytes / bi_us / 1e3:.0f}", f"{io_bytes / stock_us / 1e3:.0f}",
            ])
    return rows


HEADER = ["op", "shape", "M", "bi us", "stock us", "bi/stock", "bi TFLOP/s", "stock TFLOP/s", "bi GB/s", "stock GB/s"]


def heading(what: str, timing: str) -> str:
    """A results heading with the date, the device and the versions, as docs/benchmarks.md records them."""
    import triton

    return (f"### {what}, {datetime.datetime.now():%Y-%m-%d %H:%M}\n\n{torch.cuda.get_device_name()}, "
            f"torch {torch.__version__}, triton {triton.__version__}; {timing}")


def publish(table: str, markdown_path: str | None) -> None:
    """Print a results table and append it to ``markdown_path`` (if given)."""
    print(table)
    if markdown_path:
        with open(markdown_path, "a") as f:
            f.write(table + "\n")


def markdown(title: str, rows: list[list[str]]) -> str:
    lines = [title, "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", help="bi op names to time (default: all)")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--ms", nargs="+", type=int, default=list(DEFAULT_MS), help="rows M per call")
    parser.add_argument("--shapes", nargs="+", choices=PRESETS, default=[], help="model presets (default: Qwen3-8B projections, Qwen3-0.6B lm_head, hidden 1024 and 4096)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="time back-to-back calls in a CUDA graph on L2-cold inputs (kernel time, no host cost)")
    parser.add_argument("--markdown", metavar="FILE", help="append the table to FILE")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU: torch.cuda.is_available() is False")
    import_op_modules()
    shapes = selected_shapes(args.shapes)
    cases = [c for build in CASE_BUILDERS for c in build(shapes) if not args.ops or c.op in args.ops]
    rows = run(cases, args.ms, DTYPES[args.dtype], args.cuda_graph)
    mode = GRAPH_TIMING if args.cuda_graph else "eager calls, L2 flushed"
    publish(markdown(heading(f"bi ops vs stock, {args.dtype}", mode), rows),
            args.markdown)


if __name__ == "__main__":
    main()
