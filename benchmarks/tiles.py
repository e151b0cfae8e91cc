"""Search the matmul tile table: time candidate tiles of the bi matmul kernel against cuBLAS, and check their bits.

    PYTHONPATH=. python benchmarks/tiles.py --json tiles.json --markdown tiles.md
    PYTHONPATH=. python benchmarks/tiles.py --ms 1 8 32 --shapes 4096x4096

For each linear shape (K -> N) and M, every candidate ``TileConfig`` runs on the same L2-cold inputs, back to back in a
CUDA graph (the timing of ``benchmarks/kernels.py --cuda-graph``), beside ``F.linear``. A candidate may change how the
output is cut into programs, how long a K chunk each pipeline stage loads (``LONG_K``) and how tiles are loaded and
scheduled (``HOPPER``: TMA, persistent programs), never the K order, so it
must give the current pick's bits; the table says where one does not (such a candidate must never enter a tile
table). The best candidate per row is what a tile table could reach at most.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F
from kernels import DEFAULT_MS, DEFAULT_SHAPES, GRAPH_TIMING, graph_sets, heading, publish, time_us

from bi_compile.kernels.device import target
from bi_compile.kernels.matmul import TileConfig, matmul, pick_tiles, tile_table

# Few rows: weight streaming, so narrow strips and deep pipelines; many rows: wgmma tiles. (Pruned to the tiles that
# won a row or came within 3% in the searches of 2026-11-23: docs/lab-log.md, "Tile search for the portable table".)
FEW_ROWS = [TileConfig(bm, bn, w, s) for bm, bn, w, s in [
    (16, 32, 4, 6), (16, 64, 4, 6), (64, 32, 4, 6), (64, 64, 4, 6), (16, 32, 2, 6), (16, 64, 2, 6)]]
MANY_ROWS = [TileConfig(bm, bn, w, s) for bm, bn, w, s in [
    (64, 64, 4, 6), (64, 128, 4, 4), (128, 128, 8, 3), (128, 128, 8, 4), (128, 256, 8, 3), (128, 256, 8, 4)]]
FEW_ROWS_MAX_M = 128
# A longer K chunk: more bytes in flight per stage. The tensor cores still add K in steps of 16 into one fp32
# accumulator, so the bits may not change with it; the bit check says whether they do.
LONG_K = [TileConfig(bm, bn, w, s, block_k=bk) for bm, bn, w, s, bk in [
    (16, 32, 4, 3, 256), (16, 32, 4, 4, 128), (16, 64, 4, 3, 128), (64, 32, 4, 4, 128), (64, 64, 4, 4, 128),
    (16, 32, 2, 3, 256)]]
# Hopper: TMA loads, alone or with persistent programs whose flattened loop overlaps a tile's epilogue with the next
# tile's loads.
HOPPER = [TileConfig(bm, bn, w, s, block_k=bk, tma=True, persistent=p) for bm, bn, w, s, bk, p in [
    (128, 128, 8, 4, 0, False), (128, 256, 8, 3, 0, False), (128, 256, 8, 4, 0, False),
    (128, 128, 8, 4, 0, True), (128, 256, 8, 3, 0, True), (128, 256, 8, 4, 0, True), (64, 256, 4, 4, 0, True),
    (128, 256, 8, 2, 128, True)]]


def label(tiles: TileConfig) -> str:
    flags = " tma" * tiles.tma + " persistent" * tiles.persistent
    return f"{tiles.block_m}x{tiles.block_n}{f'x{tiles.block_k}' if tiles.block_k else ''} w{tiles.num_warps} s{tiles.num_stages}{flags}"


def sweep(k: int, n: int, m: int, dtype: torch.dtype) -> dict:
    weight = lambda: (torch.randn(n, k, device="cuda") / k**0.5).to(dtype)  # noqa: E731
    first = (torch.randn(m, k, device="cuda").to(dtype), weight())
    arg_sets = [first] + [(torch.randn(m, k, device="cuda").to(dtype), weight()) for _ in range(graph_sets(first) - 1)]
    device = first[0].device
    current = pick_tiles(m, n, dtype, target(device).cube_cores, table=tile_table(target(device)))
    candidates = (FEW_ROWS if m <= FEW_ROWS_MAX_M else []) + (MANY_ROWS if m >= FEW_ROWS_MAX_M else [])
    candidates += LONG_K if m <= FEW_ROWS_MAX_M else HOPPER
    candidates = [current] + [t for t in candidates if t != current]

    def bi(tiles: TileConfig):
        return lambda x, w: matmul(x[None], w.t()[None], tiles=tiles)

    reference = bi(current)(*first)
    row = {"k": k, "n": n, "m": m, "cublas_us": time_us(F.linear, arg_sets, True), "current": label(current),
           "candidates": {}, "different_bits": [], "failed": {}}
    for tiles in candidates:
        try:
            same_bits = torch.equal(bi(tiles)(*first), reference)
        except Exception as error:  # noqa: BLE001 - too much shared memory, or a lowering this Triton lacks
            row["failed"][label(tiles)] = f"{type(error).__name__}: {str(error)[:200]}"
            print(f"skip {label(tiles)}: {row['failed'][label(tiles)]}")
            continue
        if not same_bits:
            row["different_bits"].append(label(tiles))
            continue
        row["candidates"][label(tiles)] = time_us(bi(tiles), arg_sets, True)
    return row


def summary(rows: list[dict]) -> str:
    current = [r["candidates"][r["current"]] / r["cublas_us"] for r in rows]
    best = [min(r["candidates"].values()) / r["cublas_us"] for r in rows]
    return (f"bi/cuBLAS over {len(rows)} rows: current table median {statistics.median(current):.2f}, worst "
            f"{max(current):.2f}; best candidate per row median {statistics.median(best):.2f}, worst {max(best):.2f}")


def markdown(rows: list[dict], title: str) -> str:
    lines = [title, "", "| K->N | M | cuBLAS us | current | us | ratio | best | us | ratio | different bits | failed |",
             "|---|---:|---:|---|---:|---:|---|---:|---:|---|---|"]
    for r in rows:
        best = min(r["candidates"], key=r["candidates"].get)
        cur_us, best_us = r["candidates"][r["current"]], r["candidates"][best]
        lines.append(f"| {r['k']}->{r['n']} | {r['m']} | {r['cublas_us']:.1f} | {r['current']} | {cur_us:.1f} | "
                     f"{cur_us / r['cublas_us']:.2f} | {best} | {best_us:.1f} | {best_us / r['cublas_us']:.2f} | "
                     f"{', '.join(r['different_bits']) or 'none'} | {', '.join(r['failed']) or 'none'} |")
    return "\n".join(lines + ["", summary(rows)]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ms", nargs="+", type=int, default=list(DEFAULT_MS))
    parser.add_argument("--shapes", nargs="+", metavar="KxN", help="default: the Qwen3-8B projections and the 0.6B lm_head")
    parser.add_argument("--json", help="write every timing to this file")
    parser.add_argument("--markdown", help="append the table to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/tiles.py needs a CUDA GPU")
    from tqdm import tqdm

    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes] if args.shapes else list(DEFAULT_SHAPES.matmuls)
    rows = []
    for k, n in tqdm(shapes, desc="shapes"):
        for m in args.ms:
            rows.append(sweep(k, n, m, torch.bfloat16))
            if args.json:  # row by row, so that a run cut short by a time limit keeps what it measured
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)
    title = heading("Tile search, bf16", GRAPH_TIMING)
    publish(markdown(rows, title), args.markdown)


if __name__ == "__main__":
    main()
