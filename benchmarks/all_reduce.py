"""bi.all_reduce vs NCCL's all-reduce at decode and prefill message sizes, on N GPUs of one host.

    python benchmarks/all_reduce.py [--ranks 4] [--batches 1 2 4 ... 256] [--hidden 4096] [--iters 50] [--out FILE.json]

Each rank times, per batch size, the stock ``dist.all_reduce`` (NCCL, in place on a copy) and ``torch.ops.bi.all_reduce``
(an NCCL all-gather, then a rank-order fp32 sum) on a [batch, hidden] bf16 tensor: CUDA events around each call after
a warm-up, the median over ``--iters`` calls, and the slowest rank's median is reported (a collective ends when its
last rank does). It also checks, per batch size, that bi.all_reduce gives a probe row the same bits alone and at a
random row of the batch, and records whether the stock all-reduce does (the issue's target: bi at most 1.3x NCCL at
decode sizes). The result, with the date, the GPUs and the versions, goes to stdout and to ``--out``.

Needs at least two CUDA GPUs (four for the issue's numbers); anywhere else it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
from pathlib import Path

import torch

DECODE_PREFILL_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def median_ms(fn, iters: int) -> float:
    for _ in range(3):  # warm-up: NCCL's communicator and the allocator settle
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def probe_stays(reduce, batch: int, hidden: int, rank: int) -> bool:
    """Whether ``reduce`` gives a probe row the same bits alone as at a random row of a [batch, hidden] message (each
    rank its own partials; the row the same on every rank)."""
    partials = torch.Generator().manual_seed(rank * 1000 + batch)
    probe = torch.randn(1, hidden, generator=partials).to("cuda", torch.bfloat16)
    x = torch.randn(batch, hidden, generator=partials).to("cuda", torch.bfloat16)
    row = int(torch.randint(batch, (1,), generator=torch.Generator().manual_seed(batch)))
    x[row] = probe[0]
    return torch.equal(reduce(x)[row], reduce(probe)[0])


def rank_main(rank: int, ranks: int, port: int, args, results) -> None:
    import torch.distributed as dist

    import bi_compile.ops  # noqa: F401  (registers torch.ops.bi)

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=ranks, device_id=torch.device("cuda", rank))
    group = dist.group.WORLD.group_name

    def stock(x):
        y = x.clone()
        dist.all_reduce(y)
        return y

    def bi(x):
        return torch.ops.bi.all_reduce(x, group)

    rows = []
    for batch in args.batches:
        x = torch.randn(batch, args.hidden, generator=torch.Generator().manual_seed(rank)).to("cuda", torch.bfloat16)
        nccl_ms, bi_ms = median_ms(lambda: stock(x), args.iters), median_ms(lambda: bi(x), args.iters)
        rows.append({"batch": batch, "bytes": x.numel() * x.element_size(), "nccl_ms": nccl_ms, "bi_ms": bi_ms,
                     "bi_invariant": probe_stays(bi, batch, args.hidden, rank),
                     "nccl_invariant": probe_stays(stock, batch, args.hidden, rank)})
    results.put((rank, rows))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(args) -> dict:
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=rank_main, args=(rank, args.ranks, port, args, results))
                 for rank in range(args.ranks)]
    for process in processes:
        process.start()
    by_rank = dict(results.get(timeout=args.timeout) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    table = []
    for i, batch in enumerate(args.batches):
        per_rank = [by_rank[r][i] for r in range(args.ranks)]
        nccl_ms, bi_ms = max(r["nccl_ms"] for r in per_rank), max(r["bi_ms"] for r in per_rank)
        table.append({"batch": batch, "bytes": per_rank[0]["bytes"], "nccl_ms": round(nccl_ms, 4),
                      "bi_ms": round(bi_ms, 4), "bi_over_nccl": round(bi_ms / nccl_ms, 3),
                      "bi_invariant": all(r["bi_invariant"] for r in per_rank),
                      "nccl_invariant": all(r["nccl_invariant"] for r in per_rank)})
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "devices": [torch.cuda.get_device_name(r) for r in range(args.ranks)],
        "torch": torch.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        "ranks": args.ranks, "hidden": args.hidden, "dtype": "bfloat16", "iters": args.iters, "rows": table,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4, help="GPUs (one rank each); the issue's numbers are at 4")
    parser.add_argument("--batches", type=int, nargs="+", default=list(DECODE_PREFILL_BATCHES))
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=50, help="timed calls per size and op (the median is kept)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the ranks")
    parser.add_argument("--out", type=Path, help="write the result as JSON here too")
    args = parser.parse_args(argv)
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.ranks < 2 or available < args.ranks:
        print(f"all_reduce.py: needs {max(args.ranks, 2)} CUDA GPUs on one host (--ranks {args.ranks}), found "
              f"{available}; an all-reduce over one rank measures nothing", file=sys.stderr)
        return 2
    result = run(args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
