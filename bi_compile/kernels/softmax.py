"""Batch-invariant softmax and log_softmax over the last dim (Triton).

    m = max_j x_j,   S = sum_j exp(x_j - m)    (fp32)
    softmax = exp(x - m) * (1 / S),   log_softmax = (x - m) - log(S)

The max is exact in any order; the sum of exponentials is what needs a fixed order. One program owns a row
and accumulates in fixed chunks (``reduce.row_blocking``):

* rows up to ``reduce.FUSED_MAX``: the whole row in registers, one read and one write;
* longer rows (vocab logits): an online pass keeps, per lane of the chunk, a running max ``m_l`` and
  ``S_l = sum exp(x - m_l)`` (rescaled when ``m_l`` grows, with the same single exp per element), folded at the
  end as ``S = sum_l S_l * exp(m_l - m)``; then a second pass writes the output. Two reads and one write instead
  of three reads, with an order fixed by the row length. A 151936-wide bf16 row is 304 KB; what the second pass
  reads again must not come from HBM. L2 does not keep it (132 rows in flight stream 80 MB through it), L1 (248 KB
  per SM) keeps the end of the row, so the second pass walks the row backwards, and the first two chunks (32 KB)
  stay in registers. H100, 256 rows: HBM reads 89 MB for a 78 MB input, where the second pass of one chunk at a
  time read 96 MB (Nsight Compute, docs/benchmarks.md, session 8).

Every exp is ``tl.exp2(t * log2(e))``: on NVIDIA that is one multiply and ``ex2.approx.ftz``, where ``tl.exp`` adds
three instructions per element to keep results below 2**-126 (about 1.2e-38) denormal; here they flush to zero. The
sums of exponentials are 0 or at least 1, so their bits do not change (nor log_softmax's), and softmax outputs differ
from ``tl.exp``'s only below 1.2e-38 (H100 measurement: docs/benchmarks.md, session 6).

All -inf rows give NaN and a NaN or +inf anywhere in a row makes the whole row NaN, as in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reduce import RowBlocking, row_blocking, row_grid, row_offsets

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _online_update(x, lane_max, lane_sum):
    """Fold a chunk into the lanes' running max and sum of exp(x - max), with one exp per element: exp(x - max) if x
    does not raise the lane's max, else exp(old max - x), which rescales the running sum (and x's own term is 1)."""
    x = x.to(tl.float32)
    grows = x > lane_max
    e = tl.exp2(tl.abs(x - lane_max) * -LOG2E)  # one FMUL: the sign rides on the constant
    return tl.where(grows, x, lane_max), tl.where(grows, lane_sum * e + 1.0, lane_sum + e)


@triton.jit
def _read_chunk(x_rows, start, cols, row_mask, n_cols):
    """A first-pass read. evict_last: the second pass reads the chunk again."""
    mask = row_mask & (start + cols < n_cols)
    return tl.load(x_rows + start + cols, mask=mask, other=float("-inf"), eviction_policy="evict_last")


@triton.jit
def _write_chunk(x, y_rows, start, cols, row_mask, n_cols, shift, total, inv_total, LOG: tl.constexpr):
    x = x.to(tl.float32)
    if LOG:
        y = (x - shift) - tl.log(total)
    else:
        y = tl.exp2((x - shift) * LOG2E) * inv_total
    mask = row_mask & (start + cols < n_cols)
    tl.store(y_rows + start + cols, y.to(y_rows.dtype.element_ty), mask=mask, eviction_policy="evict_first")


@triton.jit(do_not_specialize=["n_rows"])
def _softmax_kernel(
    x_ptr, y_ptr, n_rows, n_cols, n_inner, stride_outer, stride_inner,
    LOG: tl.constexpr, FUSED: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = rows[:, None] < n_rows
    x_rows = x_ptr + row_offsets(rows, n_rows, n_cols, n_inner, stride_outer, stride_inner)[:, None]
    y_rows = y_ptr + rows.to(tl.int64)[:, None] * n_cols  # y is a fresh contiguous [n_rows, n_cols]
    cols = tl.arange(0, BLOCK)[None, :]
    if FUSED:
        mask = row_mask & (cols < n_cols)
        x = tl.load(x_rows + cols, mask=mask, other=float("-inf")).to(tl.float32)
        shifted = x - tl.max(x, axis=1)[:, None]
        exp = tl.exp2(shifted * LOG2E)
        total = tl.sum(exp, axis=1)[:, None]
        if LOG:
            y = shifted - tl.log(total)
        else:
            y = exp * (1.0 / total)
        tl.store(y_rows + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # -FLT_MAX, not -inf: x - lane_max is then never -inf - -inf, so masked and -inf elements need no test.
        lane_max = tl.full([ROWS, BLOCK], -3.4028234663852886e38, dtype=tl.float32)
        lane_sum = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        # Chunks are read two at a time (both loads in flight before either is used) and folded one after the
        # other, in row order. The first two stay in registers for the second pass.
        head0 = _read_chunk(x_rows, 0, cols, row_mask, n_cols)
        head1 = _read_chunk(x_rows, BLOCK, cols, row_mask, n_cols)
        lane_max, lane_sum = _online_update(head0, lane_max, lane_sum)
        lane_max, lane_sum = _online_update(head1, lane_max, lane_sum)
        for start in range(2 * BLOCK, n_cols, 2 * BLOCK):
            first = _read_chunk(x_rows, start, cols, row_mask, n_cols)
            second = _read_chunk(x_rows, start + BLOCK, cols, row_mask, n_cols)
            lane_max, lane_sum = _online_update(first, lane_max, lane_sum)
            lane_max, lane_sum = _online_update(second, lane_max, lane_sum)
        shift = tl.max(lane_max, axis=1)[:, None]
        total = tl.sum(lane_sum * tl.exp2((lane_max - shift) * LOG2E), axis=1)[:, None]
        inv_total = 1.0 / total  # one IEEE division per row, not per element
        n_chunks = tl.cdiv(n_cols, BLOCK)
        for chunk in range(0, n_chunks - 2):
            # Last chunk first: what the first pass read last is what L1 still holds.
            start = (n_chunks - 1 - chunk) * BLOCK
            x = tl.load(x_rows + start + cols, mask=row_mask & (start + cols < n_cols), other=float("-inf"),
                        eviction_policy="evict_first")
            _write_chunk(x, y_rows, start, cols, row_mask, n_cols, shift, total, inv_total, LOG)
        _write_chunk(head1, y_rows, BLOCK, cols, row_mask, n_cols, shift, total, inv_total, LOG)
        _write_chunk(head0, y_rows, 0, cols, row_mask, n_cols, shift, total, inv_total, LOG)


def softmax(x: torch.Tensor, out_dtype: torch.dtype, log: bool = False, *,
            blocking: RowBlocking | None = None) -> torch.Tensor:
    """(log_)softmax of ``x`` [..., N] (unit stride along N) over its last dim -> fresh contiguous, ``out_dtype``.

    ``blocking`` overrides ``row_blocking(N)``, for benchmarks/rows.py's search. A blocking is a function of N in
    the ops, never of M."""
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if y.numel() == 0:
        return y
    (x,), grid = row_grid(x)
    (stride_outer, stride_inner), = grid.strides
    cfg = blocking or row_blocking(x.shape[-1])
    _softmax_kernel[(triton.cdiv(grid.n_rows, cfg.rows),)](
        x, y, grid.n_rows, x.shape[-1], grid.n_inner, stride_outer, stride_inner,
        LOG=log, FUSED=cfg.fused, BLOCK=cfg.block, ROWS=cfg.rows, num_warps=cfg.num_warps,
    )
    return y
