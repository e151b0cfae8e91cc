"""Helpers the row-op tests share: a scoped CPU thread count, and random (batch, row) draws."""

from __future__ import annotations

import contextlib
import random

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
