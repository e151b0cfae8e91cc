"""Search the row blocking of each row length for every row kernel, timing each against issue 7's bandwidth target.

    PYTHONPATH=. python benchmarks/rows.py --json rows.json --markdown rows.md
    PYTHONPATH=. python benchmarks/rows.py --ms 8192 --ops sum
    PYTHONPATH=. python benchmarks/rows.py --ops layer_norm --ms 256 2048 8192 --markdown layer_norm.md

The target: at M >= 256 rows, >= 80% of the device's copy bandwidth, counting each input read once and each output
written once; where a copy of the same bytes cannot reach that (calls of a few MB are launch-bound), 80% of that
copy (``bar_gbs``). LayerNorm's target (issue 24) is 85% of a copy of the same bytes at M >= 256, widths 768 to 8192
(GPT-2 to the largest hidden sizes of the LayerNorm families). A row blocking (``reduce.RowBlocking``: chunk length, rows per program, warps) is one fixed reduction
order per row length, shared by every row kernel (``reduce.row_blocking``; the centring kernels, LayerNorm and
var_mean, take their own warps), so each width is searched for sum, mean, softmax, log_softmax and rms_norm together:

- rows that fit one chunk (hidden sizes 1024, 4096): rows per program x warps;
- longer rows (the 151936 vocabulary): chunk lengths x warps, for sum, softmax and log_softmax.

Each candidate is checked for invariance here (rows of a call of M rows, and a row alone, against the same rows inside
an 8192-row call) and timed like ``benchmarks/kernels.py --cuda-graph`` (median of do_bench_cudagraph, back-to-back calls on
L2-cold inputs), beside the stock op, a copy that moves the same bytes timed the same way (what the size allows: a small
call is launch-bound), and the device's copy bandwidth, all measured in the same run.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from kernels import GRAPH_TIMING, graph_sets, heading, publish, time_us

from bi_compile.kernels.device import Backend
from bi_compile.kernels.reduce import ROW_POLICIES, RowBlocking, row_blocking, row_sum
from bi_compile.kernels.rms_norm import layer_norm, rms_norm
from bi_compile.kernels.softmax import softmax

M_CHECK = 8192  # the call the invariance check compares every other M against
EPS = 1e-6


def label(blocking: RowBlocking) -> str:
    pieces = f" piece {blocking.piece}" if blocking.piece else ""
    return f"block {blocking.block} rows {blocking.rows} w{blocking.num_warps}{pieces}"


def candidates(width: int, split: bool) -> list[RowBlocking]:
    """Rows that fit one chunk: rows per program x warps (2 for the short rows of a latency-bound call), up to 128
    elements per thread (what the registers hold).
    Longer rows: chunk lengths x warps, up to 64 elements per thread and chunk (the online softmax keeps two fp32
    accumulators per element of a chunk); for a kernel that can ``split`` a row, also 1, 2 or 4 chunks per program."""
    if width <= ROW_POLICIES[Backend.CUDA].fused_max:
        block = triton.next_power_of_2(width)
        shapes = itertools.product((1, 2, 4, 8, 16), (2, 4, 8, 16))  # rows per program, warps
        return [RowBlocking(block, rows, True, warps) for rows, warps in shapes if block * rows // (32 * warps) <= 128]
    whole = [RowBlocking(block, 1, False, warps) for block, warps in itertools.product((4096, 8192, 16384, 32768), (16, 32))
             if block // (32 * warps) <= 64]
    pieces = [RowBlocking(block, 1, False, warps, piece) for block, warps, piece in
              itertools.product((4096, 8192, 16384), (4, 8, 16, 32), (1, 2, 4)) if 8 <= block // (32 * warps) <= 64]
    return whole + pieces if split else whole


@dataclass(frozen=True)
class Op:
    name: str
    width: int
    run: Callable[[torch.Tensor, RowBlocking | None], torch.Tensor]  # None: the current blocking, row_blocking(width)
    stock: Callable[[torch.Tensor], torch.Tensor]
    max_m: int = 1 << 20  # vocab rows stop at 8192 (2.5 GB of bf16 logits): larger M adds time, not information
    split: bool = False  # the kernel may split a row across programs (row_blocking(width, split=True))
    centred: bool = False  # the kernel centres a row on its mean first (row_blocking(width, centred=True))


def sum_op(width: int, mean: bool, max_m: int = Op.max_m) -> Op:
    return Op("mean" if mean else "sum", width, lambda x, b: row_sum(x, x.dtype, mean=mean, blocking=b),
              lambda t: t.mean(-1) if mean else t.sum(-1), max_m, split=True)


def softmax_op(width: int, log: bool, max_m: int = Op.max_m) -> Op:
    stock = torch.log_softmax if log else torch.softmax
    return Op("log_softmax" if log else "softmax", width, lambda x, b: softmax(x, x.dtype, log=log, blocking=b),
              lambda t: stock(t, -1), max_m)


def rms_norm_op(width: int) -> Op:
    @functools.cache  # made once, outside the timed graph, on first use (this module imports without a GPU)
    def weight(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(width, device=device).to(dtype)

    return Op("rms_norm", width, lambda x, b: rms_norm(x, weight(x.device, x.dtype), EPS, blocking=b)[0],
              lambda t: F.rms_norm(t, (width,), weight(t.device, t.dtype), EPS))


def layer_norm_op(width: int) -> Op:
    @functools.cache  # weight and bias, made once, outside the timed graph, on first use
    def affine(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(width, device=device).to(dtype), torch.randn(width, device=device).to(dtype)

    return Op("layer_norm", width, lambda x, b: layer_norm(x, *affine(x.device, x.dtype), EPS, blocking=b)[0],
              lambda t: F.layer_norm(t, (width,), *affine(t.device, t.dtype), EPS), centred=True)


# A row blocking is shared by every row kernel (reduce.row_blocking), so each width is searched for all of them.
HIDDEN = (1024, 4096)
LAYER_NORM_WIDTHS = (768, 1024, 2048, 2560, 4096, 8192)  # GPT-2, Pythia-410M, Pythia-1.4B, Phi-2, ..., 8192
OPS = ([sum_op(w, mean) for w in HIDDEN for mean in (False, True)] + [softmax_op(w, log) for w in HIDDEN for log in (False, True)]
       + [rms_norm_op(w) for w in HIDDEN] + [layer_norm_op(w) for w in LAYER_NORM_WIDTHS]
       + [sum_op(151936, False, max_m=8192)] + [softmax_op(151936, log, max_m=8192) for log in (False, True)])


def invariant(op: Op, blocking: RowBlocking | None, x: torch.Tensor, ms: list[int]) -> bool:
    """Rows of each call of M rows (at an offset) and row 5 alone have the bits of the same rows in the M_CHECK call."""
    full = op.run(x, blocking)
    calls = [(7, m) for m in ms if m + 7 <= len(x)] + [(5, 1)]
    return all(torch.equal(op.run(x[start : start + m], blocking), full[start : start + m]) for start, m in calls)


@triton.jit
def _copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets, mask=offsets < n), mask=offsets < n)


def sm_copy(src: torch.Tensor, dst: torch.Tensor) -> None:
    """A copy run by the SMs, as the ops are. Not ``dst.copy_(src)``: captured in a CUDA graph it moves 1 GiB at
    2433 GB/s on the H100, where it reaches 3002 eager and this kernel 2989 in the graph (docs/lab-log.md, "How the
    kernels are timed")."""
    _copy_kernel[(triton.cdiv(src.numel(), 8192),)](src, dst, src.numel(), BLOCK=8192, num_warps=8)


def copy_gbs(io_bytes: int = 1 << 31) -> float:
    """GB/s of a copy that moves ``io_bytes`` (read + write), timed like the ops; the default, 1 GiB, is the
    device's bandwidth."""
    half = lambda: torch.empty(io_bytes // 4, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    first = (half(), half())
    pairs = [first] + [(half(), half()) for _ in range(graph_sets(first) - 1)]
    return io_bytes / time_us(sm_copy, pairs, True) / 1e3


def checked(op: Op, dtype: torch.dtype, check_ms: list[int]) -> tuple[list[RowBlocking], dict]:
    """The candidates that pass the invariance check (once per op, on M_CHECK rows), and what happened to the rest."""
    x = torch.randn(M_CHECK, op.width, device="cuda").to(dtype)
    passed, rejected = [], {}
    for blocking in candidates(op.width, op.split):
        try:
            if invariant(op, blocking, x, check_ms):
                passed.append(blocking)
            else:
                rejected[label(blocking)] = "variant"
        except Exception as error:  # noqa: BLE001 - too many registers or too much shared memory for this GPU
            rejected[label(blocking)] = f"failed: {type(error).__name__}: {str(error)[:200]}"
    return passed, rejected


def sweep(op: Op, m: int, dtype: torch.dtype, blockings: list[RowBlocking]) -> dict:
    make = lambda: (torch.randn(m, op.width, device="cuda").to(dtype),)  # noqa: E731
    first = make()
    arg_sets = [first] + [make() for _ in range(graph_sets(first) - 1)]
    io_bytes = first[0].numel() * first[0].element_size() + op.stock(first[0]).numel() * first[0].element_size()
    gbs = lambda us: io_bytes / us / 1e3  # noqa: E731
    current = row_blocking(op.width, op.split, centred=op.centred)
    return {"op": op.name, "width": op.width, "m": m, "current": label(current),
            "same_size_copy_gbs": copy_gbs(io_bytes),
            "stock_gbs": gbs(time_us(op.stock, arg_sets, True)),
            "current_gbs": gbs(time_us(lambda t: op.run(t, None), arg_sets, True)),
            "candidates": {label(b): gbs(time_us(lambda t, b=b: op.run(t, b), arg_sets, True)) for b in blockings}}


def bar_gbs(op: str, copy: float, same_size_copy: float) -> float:
    """Issue 7's bar for one cell: 80% of the device's copy bandwidth, or of a copy that moves the same bytes where
    that copy is slower (a small call is launch-bound, and no kernel moves its bytes faster than a copy does).
    LayerNorm's (issue 24): 85% of the copy of the same bytes."""
    return 0.85 * same_size_copy if op == "layer_norm" else 0.8 * min(copy, same_size_copy)


def markdown(rows: list[dict], rejected: dict, copy: float, title: str) -> str:
    lines = [title, "", f"Copy bandwidth in this run: {copy:.0f} GB/s; the target is 80% of it, {0.8 * copy:.0f} GB/s. "
             "A copy that moves the op's bytes, timed the same way, shows what the size allows; where it is slower, "
             "the bar is 80% of that copy. LayerNorm's bar is 85% of that copy.", "",
             "| op | width | M | same-size copy GB/s | stock GB/s | current | GB/s | % copy | bar GB/s | met | best | GB/s "
             "| % copy |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|---|---|---:|---:|"]
    misses = []
    for r in rows:
        best = max(r["candidates"], key=r["candidates"].get, default="-")
        best_gbs = r["candidates"].get(best, 0.0)
        bar = bar_gbs(r["op"], copy, r["same_size_copy_gbs"])
        met = r["current_gbs"] >= bar
        if not met:
            misses.append(f"{r['op']} {r['width']} x {r['m']}")
        lines.append(f"| {r['op']} | {r['width']} | {r['m']} | {r['same_size_copy_gbs']:.0f} | {r['stock_gbs']:.0f} | "
                     f"{r['current']} | {r['current_gbs']:.0f} | {100 * r['current_gbs'] / copy:.0f} | {bar:.0f} | "
                     f"{'yes' if met else '**no**'} | {best} | {best_gbs:.0f} | {100 * best_gbs / copy:.0f} |")
    lines += ["", f"Current blockings below their bar: {', '.join(misses) or 'none'}."]
    lines += ["", "Candidates left out (a variant one must never enter a table):", ""]
    lines += [f"- {op}: {label}: {why}" for op, reasons in rejected.items() for label, why in reasons.items()] or ["- none"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ms", nargs="+", type=int, default=[256, 2048, 8192, 32768])
    parser.add_argument("--ops", nargs="+", choices=sorted({op.name for op in OPS}), help="default: all")
    parser.add_argument("--json", help="write every measurement to this file, row by row")
    parser.add_argument("--markdown", help="append the table to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/rows.py needs a CUDA GPU")
    from tqdm import tqdm

    copy = copy_gbs()
    rows, rejected = [], {}
    for op in tqdm([op for op in OPS if not args.ops or op.name in args.ops], desc="ops"):
        passed, rejected[f"{op.name} {op.width}"] = checked(op, torch.bfloat16, check_ms=[1, 3, 255, 2048])
        for m in (m for m in args.ms if m <= op.max_m):
            rows.append(sweep(op, m, torch.bfloat16, passed))
            if args.json:  # row by row, so that a run cut short by a time limit keeps what it measured
                with open(args.json, "w") as f:
                    json.dump({"copy_gbs": copy, "rows": rows, "rejected": rejected}, f, indent=1)
    title = heading("Row-kernel search, bf16", GRAPH_TIMING)
    publish(markdown(rows, rejected, copy, title), args.markdown)


if __name__ == "__main__":
    main()
