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
