"""Batch-invariant softmax, log_softmax and logsumexp over the last dim (Triton).

    m = max_j x_j,   S = sum_j exp(x_j - m)    (fp32)
    softmax = exp(x - m) * (1 / S),   log_softmax = (x - m) - log(S),   logsumexp = m + log(S), one per row

The max is exact in any order; the sum of exponentials is what needs a fixed order. One program owns a row
and accumulates in fixed chunks (``reduce.row_blocking``):

* rows up to the backend's ``RowPolicy.fused_max``: the whole row on chip, one read and one write;
* longer rows on Ascend (``LOOPED_ROWS``): a first pass over 2-D ``[1, BLOCK]`` chunks keeps a running row max
  ``m`` and one sum per element of a chunk, ``S_j <- S_j * exp(m_old - m) + exp(x_j - m)``, folded by one tl.sum
  over BLOCK at the end; a second pass reads the row again and writes. Each lane adds its elements in row order
  and the fold's tree is BLOCK's, so the order is fixed by (N, dtype);
* longer rows on CUDA (vocab logits): a first pass keeps one lane per thread, a running max ``m_l`` and
  ``S_l = sum exp(x - m_l)`` over the elements that thread loads (rescaled when ``m_l`` grows), folded at the end
  as ``S = sum_l S_l * exp(m_l - m)``; then a second pass writes the output. Two reads and one write instead of
  three reads, in an order fixed by the row length and dtype. A 151936-wide bf16 row is 304 KB, and what the second
  pass reads again must not come from HBM. L2 does not keep it (132 rows in flight stream 80 MB through its 50 MB);
  L1 (248 KB per SM) keeps the last 240 KB when the second pass walks the row backwards, and the first
  ``head_chunks`` chunks (64 KB) stay in registers, which a lane per thread leaves free (a lane per element of a
  chunk held 16 registers a thread). H100, 256 rows: HBM reads 81.5 MB for a 78 MB input, where a lane per element
  and 32 KB kept read 89 MB (Nsight Compute; docs/lab-log.md, "A lane per thread, 64 KB of the row kept").

Every exp is ``tl.exp2(t * log2(e))``: on NVIDIA that is one multiply and ``ex2.approx.ftz``, where ``tl.exp`` adds
three instructions per element to keep results below 2**-126 (about 1.2e-38) denormal; here they flush to zero. The
sums of exponentials are 0 or at least 1, so their bits do not change (nor log_softmax's), and softmax outputs differ
from ``tl.exp``'s only below 1.2e-38 (H100 measurement: docs/lab-log.md, "Softmax over the vocab: exps as exp2").

All -inf rows give NaN and a NaN or +inf anywhere in a row makes the whole row NaN, as in torch. logsumexp takes
m = 0 where the max is infinite, as torch does: an all -inf row gives -inf, a row holding +inf gives +inf (in rows
longer than the backend's ``RowPolicy.fused_max`` also when it holds a NaN as well, where torch gives NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .device import Backend, launch_options, target
from .launch import KeyedKernel, aligned16, cdiv
from .reduce import ALIGN, RowBlocking, row_blocking, row_grid, row_offsets, row_programs

LOG2E = tl.constexpr(1.4426950408889634)


@dataclass(frozen=True)
class LoopedRows:
    """How the first pass over a row of several chunks keeps its statistics, per backend."""

    chunk_lanes: bool  # a running max per row and a sum per element of a chunk (else a lane per thread, CUDA)
    head_chunks: int  # chunks kept on chip between the two passes


LOOPED_ROWS = {
    # A lane per thread and 2 chunks (64 KB) kept in registers: the module docstring's HBM measurement.
    Backend.CUDA: LoopedRows(chunk_lanes=False, head_chunks=2),
    # Plain 2-D tiles: no 3-D reshape (triton-ascend #1640: reshape chains overflow the unified buffer; #2291: a
    # tl.sum over a 3-D tile is wrong on the 910B) and nothing kept, so a 4096-long chunk and its sums stay small.
    Backend.ASCEND: LoopedRows(chunk_lanes=True, head_chunks=0),
}


@triton.jit
def _online_fold(x, lane_max, lane_sum, LANES: tl.constexpr, VEC: tl.constexpr):
    """Fold a [1, W] tile into each lane's running max and sum of exp(x - max). Lane l takes the elements
    ``c * LANES * VEC + l * VEC + v``: the 16-byte vectors (VEC elements) that one thread loads, so that a fold
    moves no data between threads and the lanes cost two registers a thread."""
    W: tl.constexpr = x.shape[1]
    x = tl.reshape(x.to(tl.float32), [W // (LANES * VEC), LANES, VEC])
    new_max = tl.maximum(lane_max, tl.max(tl.max(x, axis=2), axis=0))
    tile_sum = tl.sum(tl.sum(tl.exp2((x - new_max[None, :, None]) * LOG2E), axis=2), axis=0)
    return new_max, lane_sum * tl.exp2((lane_max - new_max) * LOG2E) + tile_sum


@triton.jit
def _read_chunk(x_rows, start, cols, row_mask, n_cols, POLICY: tl.constexpr):
    mask = row_mask & (start + cols < n_cols)
    return tl.load(x_rows + start + cols, mask=mask, other=float("-inf"), eviction_policy=POLICY)


@triton.jit
def _write_chunk(x, y_rows, start, cols, row_mask, n_cols, shift, total, inv_total, LOG: tl.constexpr):
    x = x.to(tl.float32)
    if LOG:
        y = (x - shift) - tl.log(total)
    else:
        y = tl.exp2((x - shift) * LOG2E) * inv_total
    mask = row_mask & (start + cols < n_cols)
    tl.store(y_rows + start + cols, y.to(y_rows.dtype.element_ty), mask=mask, eviction_policy="evict_first")


@triton.jit
def _softmax_rows(
    rows, x_ptr, y_ptr, n_rows, n_cols, n_inner, stride_outer, stride_inner,
    LOG: tl.constexpr, LSE: tl.constexpr, FUSED: tl.constexpr, CHUNK_LANES: tl.constexpr, BLOCK: tl.constexpr,
    HEAD: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr,
):
    """LSE: y is [n_rows], one logsumexp per row; else [n_rows, n_cols], the (log_)softmax."""
    row_mask = rows[:, None] < n_rows
    x_rows = x_ptr + row_offsets(rows, n_rows, n_cols, n_inner, stride_outer, stride_inner)[:, None]
    y_rows = y_ptr + rows.to(tl.int64)[:, None] * n_cols  # y is a fresh contiguous [n_rows, n_cols]
    cols = tl.arange(0, BLOCK)[None, :]
    if FUSED:
        mask = row_mask & (cols < n_cols)
        x = tl.load(x_rows + cols, mask=mask, other=float("-inf")).to(tl.float32)
        shift = tl.max(x, axis=1)
        if LSE:
            shift = tl.where(tl.abs(shift) == float("inf"), 0.0, shift)
        shifted = x - shift[:, None]
        exp = tl.exp2(shifted * LOG2E)
        if LSE:
            lse = shift + tl.log(tl.sum(exp, axis=1))
            tl.store(y_ptr + rows, lse.to(y_ptr.dtype.element_ty), mask=rows < n_rows)
        else:
            total = tl.sum(exp, axis=1)[:, None]
            if LOG:
                y = shifted - tl.log(total)
            else:
                y = exp * (1.0 / total)
            tl.store(y_rows + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    elif CHUNK_LANES:  # a running max per row, a sum per element of the chunk: plain [1, BLOCK] tiles
        # -FLT_MAX, not -inf, as below.
        row_max = tl.full([1], -3.4028234663852886e38, dtype=tl.float32)
        lane_sum = tl.zeros([1, BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            x = _read_chunk(x_rows, start, cols, row_mask, n_cols, "").to(tl.float32)
            new_max = tl.maximum(row_max, tl.max(x, axis=1))
            lane_sum = lane_sum * tl.exp2((row_max - new_max) * LOG2E)[:, None] + tl.exp2((x - new_max[:, None]) * LOG2E)
            row_max = new_max
        total = tl.sum(lane_sum, axis=1)
        if LSE:  # as in the lane-per-thread branch below
            lse = tl.where(row_max == float("inf"), row_max, row_max + tl.log(total))
            tl.store(y_ptr + rows, lse.to(y_ptr.dtype.element_ty), mask=rows < n_rows)
        else:
            shift = row_max[:, None]
            inv_total = 1.0 / total[:, None]
            for start in range(0, n_cols, BLOCK):
                x = _read_chunk(x_rows, start, cols, row_mask, n_cols, "")
                _write_chunk(x, y_rows, start, cols, row_mask, n_cols, shift, total[:, None], inv_total, LOG)
    else:  # ROWS == 1
        # -FLT_MAX, not -inf: a lane's max is then never -inf, nor x - max -inf - -inf, so masked and -inf elements
        # need no test.
        lane_max = tl.full([LANES], -3.4028234663852886e38, dtype=tl.float32)
        lane_sum = tl.zeros([LANES], dtype=tl.float32)
        # The head stays in registers for the second pass: evict_first, L1 is for the rest of the row.
        head_cols = tl.arange(0, HEAD)[None, :]
        head = _read_chunk(x_rows, 0, head_cols, row_mask, n_cols, "evict_first")
        lane_max, lane_sum = _online_fold(head, lane_max, lane_sum, LANES, VEC)
        for start in range(HEAD, n_cols, BLOCK):
            x = _read_chunk(x_rows, start, cols, row_mask, n_cols, "evict_last")  # the second pass reads it again
            lane_max, lane_sum = _online_fold(x, lane_max, lane_sum, LANES, VEC)
        shift = tl.max(lane_max, axis=0)
        total = tl.sum(lane_sum * tl.exp2((lane_max - shift) * LOG2E), axis=0)
        if LSE:  # an all -inf row: shift is -FLT_MAX and total 0, so -inf; a +inf makes total NaN: +inf, as torch
            lse = tl.where(shift == float("inf"), shift, shift + tl.log(total))
            tl.store(y_ptr + rows, lse.to(y_ptr.dtype.element_ty), mask=rows < n_rows)
        else:
            inv_total = 1.0 / total  # one IEEE division per row, not per element
            n_chunks = tl.cdiv(tl.maximum(n_cols - HEAD, 0), BLOCK)
            for chunk in range(0, n_chunks):
                # Last chunk first: what the first pass read last is what L1 still holds.
                start = HEAD + (n_chunks - 1 - chunk) * BLOCK
                x = _read_chunk(x_rows, start, cols, row_mask, n_cols, "evict_first")
                _write_chunk(x, y_rows, start, cols, row_mask, n_cols, shift, total, inv_total, LOG)
            _write_chunk(head, y_rows, 0, head_cols, row_mask, n_cols, shift, total, inv_total, LOG)


@triton.jit(do_not_specialize=["n_rows"])
def _softmax_kernel(
    x_ptr, y_ptr, n_rows, n_cols, n_inner, stride_outer, stride_inner,
    LOG: tl.constexpr, LSE: tl.constexpr, FUSED: tl.constexpr, CHUNK_LANES: tl.constexpr, BLOCK: tl.constexpr,
    ROWS: tl.constexpr, HEAD: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr,
):
    """Program p takes the row tiles p, p + programs, ... (one each on CUDA)."""
    for tile in range(tl.program_id(0), tl.cdiv(n_rows, ROWS), tl.num_programs(0)):
        _softmax_rows(tile * ROWS + tl.arange(0, ROWS), x_ptr, y_ptr, n_rows, n_cols, n_inner, stride_outer,
                      stride_inner, LOG, LSE, FUSED, CHUNK_LANES, BLOCK, HEAD, LANES, VEC)


def softmax(x: torch.Tensor, out_dtype: torch.dtype, log: bool = False, *,
            blocking: RowBlocking | None = None) -> torch.Tensor:
    """(log_)softmax of ``x`` [..., N] (unit stride along N) over its last dim -> fresh contiguous, ``out_dtype``.

    ``blocking`` overrides ``row_blocking(N)``, for benchmarks/rows.py's search. A blocking is a function of N in
    the ops, never of M."""
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if y.numel():
        _launch(x, y, log, False, blocking)
    return y


def logsumexp(x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """log(sum(exp(x))) of ``x`` [..., N] (unit stride along N, N >= 1) over its last dim -> fresh contiguous [...]."""
    y = torch.empty(x.shape[:-1], dtype=out_dtype, device=x.device)
    if y.numel():
        _launch(x, y, False, True, None)
    return y


def _launch(x: torch.Tensor, y: torch.Tensor, log: bool, lse: bool, blocking: RowBlocking | None) -> None:
    (x,), grid = row_grid(x)
    (stride_outer, stride_inner), = grid.strides
    backend = target(x.device).backend
    cfg = blocking or row_blocking(x.shape[-1], backend=backend)
    if not cfg.fused and cfg.rows != 1:
        raise ValueError(f"softmax kernel: a row of more than one chunk takes a program of its own (rows=1), got {cfg}")
    looped = LOOPED_ROWS[backend]
    # The elements a thread loads as one vector: 16 bytes where rows are 16-byte aligned (row_grid makes them so when
    # N is a multiple of 16), else one, as the compiler can prove no alignment.
    vec = ALIGN // x.element_size() if x.shape[-1] % ALIGN == 0 else 1
    ints = (grid.n_rows, x.shape[-1], grid.n_inner, stride_outer, stride_inner)
    # The launch key (kernels/launch.py); y is fresh.
    key = (cfg, backend, x.dtype, y.dtype, log, lse, aligned16(x), ints)
    _softmax_launch(
        x.device, key, (row_programs(cdiv(grid.n_rows, cfg.rows), x.device),),
        x, y, *ints,
        LOG=log, LSE=lse, FUSED=cfg.fused, CHUNK_LANES=looped.chunk_lanes, BLOCK=cfg.block, ROWS=cfg.rows,
        HEAD=looped.head_chunks * cfg.block, LANES=min(32 * cfg.num_warps, cfg.block // vec), VEC=vec,
        **launch_options(backend, cfg.num_warps),
    )


_softmax_launch = KeyedKernel(_softmax_kernel)
