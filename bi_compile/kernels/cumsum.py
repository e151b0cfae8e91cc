"""Batch-invariant cumulative sum over the last dim (Triton).

    y[r, j] = sum_{i <= j} x[r, i]      (each element cast to the output dtype first, as aten; fp32 running sums)

One program owns a row (or packs short rows) and walks it in chunks of ``reduce.row_blocking(N).block`` elements,
first to last: ``tl.cumsum`` scans a chunk in a tree fixed by the chunk length and warp count, and the chunk's last
sum carries into the next chunk. The blocking is a function of N alone, so a row's additions are the same in any
batch. Sampling code takes it over sorted probabilities (top-p), where a row's cut-off must not move with the batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import launch_options, target
from .launch import KeyedKernel, aligned16, cdiv
from .reduce import RowBlocking, row_blocking, row_grid, row_offsets, row_programs, tl_dtype


@triton.jit(do_not_specialize=["n_rows"])
def _row_cumsum_kernel(
    x_ptr, y_ptr, n_rows, n_cols, n_inner, stride_outer, stride_inner,
    SUMMAND: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    """Program p takes the row tiles p, p + programs, ... (one each on CUDA)."""
    for tile in range(tl.program_id(0), tl.cdiv(n_rows, ROWS), tl.num_programs(0)):
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_mask = rows[:, None] < n_rows
        x_rows = x_ptr + row_offsets(rows, n_rows, n_cols, n_inner, stride_outer, stride_inner)[:, None]
        y_rows = y_ptr + rows.to(tl.int64)[:, None] * n_cols  # y is a fresh contiguous [n_rows, n_cols]
        cols = tl.arange(0, BLOCK)[None, :]
        carry = tl.zeros([ROWS], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            mask = row_mask & (start + cols < n_cols)
            x = tl.load(x_rows + start + cols, mask=mask, other=0.0).to(SUMMAND).to(tl.float32)
            y = tl.cumsum(x, axis=1) + carry[:, None]
            tl.store(y_rows + start + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
            carry = tl.sum(tl.where(cols == BLOCK - 1, y, 0.0), axis=1)  # the chunk's last running sum, exactly


def cumsum(x: torch.Tensor, out_dtype: torch.dtype, *, blocking: RowBlocking | None = None) -> torch.Tensor:
    """Cumulative sum of ``x`` [..., N] (unit stride along N) over its last dim -> fresh contiguous, ``out_dtype``.
    ``blocking`` overrides ``row_blocking(N)``, for benchmarks/rows.py's search and the tests."""
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if y.numel() == 0:
        return y
    (x,), grid = row_grid(x)
    (stride_outer, stride_inner), = grid.strides
    backend = target(x.device).backend
    cfg = blocking or row_blocking(x.shape[-1], backend=backend)
    ints = (grid.n_rows, x.shape[-1], grid.n_inner, stride_outer, stride_inner)
    key = (cfg, x.dtype, out_dtype, aligned16(x), ints)  # the launch key (kernels/launch.py); y is fresh
    _row_cumsum_launch(
        x.device, key, (row_programs(cdiv(grid.n_rows, cfg.rows), x.device),),
        x, y, *ints,
        SUMMAND=tl_dtype(out_dtype), BLOCK=cfg.block, ROWS=cfg.rows, **launch_options(backend, cfg.num_warps),
    )
    return y


_row_cumsum_launch = KeyedKernel(_row_cumsum_kernel)
