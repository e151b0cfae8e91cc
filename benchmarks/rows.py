"""Search the row kernels' launch configs where issue 7's bandwidth target is missed, with an invariance check each.

    PYTHONPATH=. python benchmarks/rows.py --json rows.json --markdown rows.md
    PYTHONPATH=. python benchmarks/rows.py --ms 8192 --ops sum

The target: at M >= 256 rows, >= 80% of the device's copy bandwidth, counting each input read once and each output
written once. Missed on the H100 (docs/benchmarks.md) by sum/mean over hidden-width rows (latency-bound programs of
one or two rows) and by softmax/log_softmax over the vocabulary (two reads of each row). The candidates:

- sum/mean: more rows per program and other warp counts (``RowBlocking.rows``, ``num_warps``);
- rows longer than one chunk (vocab logits): other chunk lengths and warps, for sum and softmax/log_softmax, and
  for softmax fewer programs looping over the rows (``programs``), so that fewer rows are in flight and more of
  the second read of a row comes from L2.

A blocking is another fixed reduction order per row (a table keyed by the row length may take it); the program count
changes no bit. Each candidate is checked for invariance here (rows of a call of M rows, and a row alone, against the
same rows inside an 8192-row call) and timed like ``benchmarks/kernels.py --cuda-graph`` (median of do_bench over
CUDA-graph replays, L2-cold), beside the stock op, a copy that moves the same bytes timed the same way (what the
size allows: a small call is launch-bound), and the device's copy bandwidth, all measured in the same run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
from kernels import graph_sets, heading, publish, time_us

from bi_compile.kernels.reduce import FUSED_MAX, RowBlocking, row_blocking, row_sum
from bi_compile.kernels.softmax import softmax

M_CHECK = 8192  # the call the invariance check compares every other M against


@dataclass(frozen=True)
class Candidate:
    blocking: RowBlocking
    programs: int | None = None  # softmax only: None is one program per row tile

    def label(self) -> str:
        b = self.blocking
        return f"block {b.block} rows {b.rows} w{b.num_warps}" + (f" programs {self.programs}" if self.programs else "")


def loop_blockings() -> list[RowBlocking]:
    """Chunk lengths and warps for rows longer than one chunk (up to 64 elements per thread and chunk)."""
    return [RowBlocking(block, 1, False, warps) for block, warps in itertools.product((4096, 8192, 16384, 32768), (16, 32))
            if block // (32 * warps) <= 64]


def sum_candidates(width: int) -> list[Candidate]:
    if width > FUSED_MAX:
        return [Candidate(b) for b in loop_blockings()]
    block = triton.next_power_of_2(width)
    return [Candidate(RowBlocking(block, rows, True, warps)) for rows, warps in itertools.product((1, 2, 4, 8, 16), (4, 8, 16))
            if block * rows // (32 * warps) <= 128]  # elements per thread the registers can hold


def softmax_candidates(width: int, processors: int) -> list[Candidate]:
    return [Candidate(b, programs) for b, programs in itertools.product(loop_blockings(), (None, processors))]


@dataclass(frozen=True)
class Op:
    name: str
    width: int
    run: Callable[[torch.Tensor, Candidate | None], torch.Tensor]  # None: the current config
    stock: Callable[[torch.Tensor], torch.Tensor]
    candidates: Callable[[int, int], list[Candidate]]
    max_m: int = 1 << 20  # vocab rows stop at 8192 (2.5 GB of bf16 logits): larger M adds time, not information


def row_op(mean: bool) -> Callable:
    return lambda x, c: row_sum(x, x.dtype, mean=mean, blocking=c and c.blocking)


def softmax_op(log: bool) -> Callable:
    return lambda x, c: softmax(x, x.dtype, log=log, blocking=c and c.blocking, programs=c and c.programs)


OPS = [Op(name, width, run, stock, lambda w, p: sum_candidates(w))
       for width in (1024, 4096)
       for name, run, stock in (("sum", row_op(False), lambda t: t.sum(-1)), ("mean", row_op(True), lambda t: t.mean(-1)))]
OPS += [Op("sum", 151936, row_op(False), lambda t: t.sum(-1), lambda w, p: sum_candidates(w), max_m=8192)]
OPS += [Op(name, 151936, run, stock, softmax_candidates, max_m=8192)
        for name, run, stock in (("softmax", softmax_op(False), lambda t: torch.softmax(t, -1)),
                                 ("log_softmax", softmax_op(True), lambda t: torch.log_softmax(t, -1)))]


def invariant(op: Op, candidate: Candidate | None, x: torch.Tensor, ms: list[int]) -> bool:
    """Rows of each call of M rows (at an offset) and row 5 alone have the bits of the same rows in the M_CHECK call."""
    full = op.run(x, candidate)
    calls = [(7, m) for m in ms if m + 7 <= len(x)] + [(5, 1)]
    return all(torch.equal(op.run(x[start : start + m], candidate), full[start : start + m]) for start, m in calls)


def copy_gbs(io_bytes: int = 1 << 31, cuda_graph: bool = False) -> float:
    """GB/s of a copy that moves ``io_bytes`` (read + write); the default, 1 GiB eager, is the device's bandwidth."""
    half = lambda: torch.empty(io_bytes // 4, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    first = (half(), half())
    pairs = [first] + [(half(), half()) for _ in range(graph_sets(first) - 1 if cuda_graph else 0)]
    return io_bytes / time_us(lambda src, dst: dst.copy_(src), pairs, cuda_graph) / 1e3


def checked(op: Op, dtype: torch.dtype, processors: int, check_ms: list[int]) -> tuple[list[Candidate], dict]:
    """The candidates that pass the invariance check (once per op, on M_CHECK rows), and what happened to the rest."""
    x = torch.randn(M_CHECK, op.width, device="cuda").to(dtype)
    passed, rejected = [], {}
    for candidate in op.candidates(op.width, processors):
        try:
            if invariant(op, candidate, x, check_ms):
                passed.append(candidate)
            else:
                rejected[candidate.label()] = "variant"
        except Exception as error:  # noqa: BLE001 - too many registers or too much shared memory for this GPU
            rejected[candidate.label()] = f"failed: {type(error).__name__}: {str(error)[:200]}"
    return passed, rejected


def sweep(op: Op, m: int, dtype: torch.dtype, candidates: list[Candidate]) -> dict:
    make = lambda: (torch.randn(m, op.width, device="cuda").to(dtype),)  # noqa: E731
    first = make()
    arg_sets = [first] + [make() for _ in range(graph_sets(first) - 1)]
    io_bytes = first[0].numel() * first[0].element_size() + op.stock(first[0]).numel() * first[0].element_size()
    gbs = lambda us: io_bytes / us / 1e3  # noqa: E731
    return {"op": op.name, "width": op.width, "m": m, "current": Candidate(row_blocking(op.width)).label(),
            "same_size_copy_gbs": copy_gbs(io_bytes, cuda_graph=True),
            "stock_gbs": gbs(time_us(op.stock, arg_sets, True)),
            "current_gbs": gbs(time_us(lambda t: op.run(t, None), arg_sets, True)),
            "candidates": {c.label(): gbs(time_us(lambda t, c=c: op.run(t, c), arg_sets, True)) for c in candidates}}


def markdown(rows: list[dict], rejected: dict, copy: float, title: str) -> str:
    lines = [title, "", f"Copy bandwidth in this run: {copy:.0f} GB/s; the target is 80% of it, {0.8 * copy:.0f} GB/s. "
             "A copy that moves the op's bytes, timed the same way, shows what the size allows.", "",
             "| op | width | M | same-size copy GB/s | stock GB/s | current | GB/s | % copy | best | GB/s | % copy |",
             "|---|---:|---:|---:|---:|---|---:|---:|---|---:|---:|"]
    for r in rows:
        best = max(r["candidates"], key=r["candidates"].get, default="-")
        best_gbs = r["candidates"].get(best, 0.0)
        lines.append(f"| {r['op']} | {r['width']} | {r['m']} | {r['same_size_copy_gbs']:.0f} | {r['stock_gbs']:.0f} | {r['current']} | {r['current_gbs']:.0f} | "
                     f"{100 * r['current_gbs'] / copy:.0f} | {best} | {best_gbs:.0f} | {100 * best_gbs / copy:.0f} |")
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

    processors = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    copy = copy_gbs()
    rows, rejected = [], {}
    for op in tqdm([op for op in OPS if not args.ops or op.name in args.ops], desc="ops"):
        candidates, rejected[f"{op.name} {op.width}"] = checked(op, torch.bfloat16, processors, check_ms=[1, 3, 255, 2048])
        for m in (m for m in args.ms if m <= op.max_m):
            rows.append(sweep(op, m, torch.bfloat16, candidates))
            if args.json:  # row by row, so that a run cut short by a time limit keeps what it measured
                with open(args.json, "w") as f:
                    json.dump({"copy_gbs": copy, "rows": rows, "rejected": rejected}, f, indent=1)
    title = heading("Row-kernel search, bf16", "median of do_bench over CUDA-graph replays, L2-cold")
    publish(markdown(rows, rejected, copy, title), args.markdown)


if __name__ == "__main__":
    main()
