"""Batch-invariant RMSNorm and add + RMSNorm (Triton).

    s    = x1 + x2                                  (add_rms_norm only: rounded to the input dtype, as torch's add)
    rstd = rsqrt(mean(x_f32 ** 2) + eps)           fp32, one per row
    y    = (x_f32 * rstd * w_f32).to(x.dtype)

Each row's sum of squares is accumulated by one program in fixed chunks (``reduce.row_blocking``), so its
bits depend on the row length and dtype only. Rows up to the backend's ``RowPolicy.fused_max`` are read once and kept in
registers; longer rows are read twice (reduce, then normalise), and add_rms_norm recomputes ``s`` on the
second read rather than reading back what another thread of the program stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import launch_options, target
from .launch import KeyedKernel, aligned16, cdiv
from .reduce import RowBlocking, aligned, row_blocking, row_grid, row_offsets, row_programs


@triton.jit
def _load_row_chunk(x1_rows, x2_rows, cols, mask, HAS_X2: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """x1 (or x1 + x2 rounded to the input dtype, like the unfused add) as fp32."""
    x = tl.load(x1_rows + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_X2:
        x2 = tl.load(x2_rows + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + x2).to(OUT_DTYPE).to(tl.float32)
    return x


@triton.jit(do_not_specialize=["n_rows"])
def _rms_norm_kernel(
    x1_ptr, x2_ptr, w_ptr, y_ptr, s_ptr, rstd_ptr,
    n_rows, n_cols, n_inner, x1_outer, x1_inner, x2_outer, x2_inner, eps,
    HAS_X2: tl.constexpr, HAS_W: tl.constexpr, FUSED: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    for tile in range(tl.program_id(0), tl.cdiv(n_rows, ROWS), tl.num_programs(0)):  # one tile each on CUDA
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_mask = rows[:, None] < n_rows
        x1_rows = x1_ptr + row_offsets(rows, n_rows, n_cols, n_inner, x1_outer, x1_inner)[:, None]
        x2_rows = x2_ptr + row_offsets(rows, n_rows, n_cols, n_inner, x2_outer, x2_inner)[:, None]
        out_rows = rows.to(tl.int64)[:, None] * n_cols  # y and s are fresh contiguous [n_rows, n_cols]
        dtype = y_ptr.dtype.element_ty
        cols = tl.arange(0, BLOCK)[None, :]
        if FUSED:
            mask = row_mask & (cols < n_cols)
            x = _load_row_chunk(x1_rows, x2_rows, cols, mask, HAS_X2, dtype)
            if HAS_X2:
                tl.store(s_ptr + out_rows + cols, x.to(dtype), mask=mask)
            rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
            y = x * rstd[:, None]
            if HAS_W:
                y = y * tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            tl.store(y_ptr + out_rows + cols, y.to(dtype), mask=mask)
        else:
            acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                mask = row_mask & (start + cols < n_cols)
                x = _load_row_chunk(x1_rows + start, x2_rows + start, cols, mask, HAS_X2, dtype)
                if HAS_X2:
                    tl.store(s_ptr + out_rows + start + cols, x.to(dtype), mask=mask)
                acc += x * x
            rstd = tl.math.rsqrt(tl.sum(acc, axis=1) / n_cols + eps)
            for start in range(0, n_cols, BLOCK):
                mask = row_mask & (start + cols < n_cols)
                x = _load_row_chunk(x1_rows + start, x2_rows + start, cols, mask, HAS_X2, dtype)
                y = x * rstd[:, None]
                if HAS_W:
                    y = y * tl.load(w_ptr + start + cols, mask=start + cols < n_cols, other=0.0).to(tl.float32)
                tl.store(y_ptr + out_rows + start + cols, y.to(dtype), mask=mask)
        tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)


def _launch(x1: torch.Tensor, x2: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
            blocking: RowBlocking | None):
    """Shared host side: x1, x2 [..., N] (unit stride along N), weight [N] contiguous or None."""
    y = torch.empty(x1.shape, dtype=x1.dtype, device=x1.device)
    s = torch.empty_like(y) if x2 is not None else None
    rstd = torch.empty(x1.shape[:-1] + (1,), dtype=torch.float32, device=x1.device)
    if y.numel() == 0:
        return y, rstd.fill_(float("nan")), s  # N = 0: the mean of no squares is NaN, as in torch
    n_cols = x1.shape[-1]
    tensors, grid = row_grid(x1, *(() if x2 is None else (x2,)))
    x1, x2 = tensors[0], tensors[-1]
    (x1_outer, x1_inner), (x2_outer, x2_inner) = grid.strides[0], grid.strides[-1]
    backend = target(x1.device).backend
    cfg = blocking or row_blocking(n_cols, backend=backend)
    weight = aligned(weight) if weight is not None else None
    ints = (grid.n_rows, n_cols, grid.n_inner, x1_outer, x1_inner, x2_outer, x2_inner)
    # The launch key (kernels/launch.py); y, s, rstd and the weight are aligned (fresh, or ``aligned``).
    key = (cfg, x1.dtype, None if weight is None else weight.dtype, s is not None, aligned16(x1), aligned16(x2), ints)
    _rms_norm_launch(
        x1.device, key, (row_programs(cdiv(grid.n_rows, cfg.rows), x1.device),),
        x1, x2, weight if weight is not None else x1, y, s if s is not None else y, rstd, *ints, eps,
        HAS_X2=s is not None, HAS_W=weight is not None, FUSED=cfg.fused, BLOCK=cfg.block, ROWS=cfg.rows,
        **launch_options(backend, cfg.num_warps),
    )
    return y, rstd, s


_rms_norm_launch = KeyedKernel(_rms_norm_kernel)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, *,
             blocking: RowBlocking | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim of ``x`` [..., N] -> (y [..., N] in x.dtype, rstd [..., 1] fp32). ``blocking``
    overrides ``row_blocking(N)``, for benchmarks/rows.py's search."""
    y, rstd, _ = _launch(x, None, weight, eps, blocking)
    return y, rstd


def add_rms_norm(x1: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor | None, eps: float):
    """``s = x1 + x2`` (rounded to the input dtype), then RMSNorm of s -> (y, rstd, s)."""
    return _launch(x1, x2, weight, eps, None)
