"""Helpers the row-op tests share: a scoped CPU thread count, random (batch, row) draws, and the GPU checks
(same row in any buffer, CUDA-graph replay, stock controls)."""

from __future__ import annotations

import contextlib
import random

import pytest
import torch


@contextlib.contextmanager
def cpu_threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def batch_draws(rng: random.Random, n_draws: int, base_rows: int, max_rows: int = 512):
    """(start, M, pos): a batch base[start:start + M] with M in 1..max_rows, and a row position inside it."""
    for _ in range(n_draws):
        m = rng.randint(1, max_rows)
        yield rng.randint(0, base_rows - m), m, rng.randrange(m)


def assert_same_rows_in_any_buffer(row_op, n: int, device: str = "cuda", dtype=torch.bfloat16, rows: int = 33):
    """``row_op`` gives a row the same bits read from a contiguous batch, a row-strided batch, a view misaligned by
    one element, and alone: a kernel's vector width must not follow the buffer's alignment."""
    x = torch.randn(rows, n, device=device, dtype=dtype)
    padded = torch.zeros(rows, n + 15, device=device, dtype=dtype)
    padded[:, :n] = x
    flat = torch.zeros(rows * n + 1, device=device, dtype=dtype)
    flat[1:] = x.flatten()
    expected = row_op(x)
    assert torch.equal(row_op(padded[:, :n]), expected)
    assert torch.equal(row_op(flat[1:].view(rows, n)), expected)
    for i in (0, 5, rows - 1):
        assert torch.equal(row_op(x[i]), expected[i])
        assert torch.equal(row_op(padded[i : i + 1, :n]), expected[i : i + 1])


def assert_graph_replays_eager_bits(op, *inputs: torch.Tensor):
    """``op(*inputs)`` captured in a CUDA graph (compiled and warmed up on a side stream first), replayed on new
    random data in the same buffers, gives the bits of an eager call on that data (a tensor or a tuple of them)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        op(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = op(*inputs)
    for t in inputs:
        t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    eager = op(*inputs)
    if not isinstance(eager, tuple):
        captured, eager = (captured,), (eager,)
    for got, want in zip(captured, eager, strict=True):
        assert torch.equal(got, want)


def skip_unless_stock_is_batch_variant(stock_op, what: str):
    """The GPU control for a row op: ``stock_op`` must give the first M rows of a seeded 4096-row batch other bits
    than the same rows inside it, for some M and width 1024 / 4096 / 151936. Stock ops keep a single row's bits
    often, so whole prefixes are compared; if stock keeps every bit, the measured fact is a skip."""
    g = torch.Generator(device="cuda").manual_seed(11)
    for n in (1024, 4096, 151936):
        x = torch.randn(4096, n, device="cuda", generator=g)
        whole = stock_op(x)
        if any(not torch.equal(stock_op(x[:m]), whole[:m]) for m in (1, 2, 3, 16, 64, 512)):
            return
    pytest.skip(f"{what} kept every row's bits at widths 1024/4096/151936 (torch {torch.__version__})")
