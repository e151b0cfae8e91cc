"""Batch-invariant row sums and means, and the row blocking and row layout shared by every row kernel.

A row kernel (here, ``rms_norm.py``, ``softmax.py``) reduces each row of a ``[..., N]`` tensor on its own:

* **Blocking** (:func:`row_blocking`): a row of length N is read in chunks of ``block(N)`` elements into a
  ``[ROWS, BLOCK]`` fp32 accumulator (elementwise adds, chunk after chunk, in row order), which one
  ``tl.sum`` over the BLOCK axis folds at the end. BLOCK, ROWS and num_warps are functions of N alone (and of
  the backend: :data:`ROW_POLICIES`), so the tree of additions for a row is fixed by (N, dtype) on a device: the
  row count M only decides how many tiles there are. Rows up to the policy's ``fused_max`` fit one chunk; those
  kernels keep the row on chip between reduction and output (one read, one write). Longer rows take one tile
  each, except in ``row_sum``, which cuts them into pieces of a length fixed by N and adds the pieces' sums in row
  order (``RowPolicy.split``). A program loops over tiles: one each on CUDA, a share of them on each of an
  Ascend NPU's vector cores (:func:`row_programs`); which program takes a tile never changes how it is summed.
* **Layout** (:func:`row_grid`): rows need unit stride along N, but not a single row stride: row
  ``r = outer * n_inner + inner`` lies at ``outer * stride_outer + inner * stride_inner``, which covers
  contiguous, row-strided, expanded (stride 0) and head-split views such as ``qkv[:, :q].view(T, H, D)``
  without a copy.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .device import Backend, launch_options, target
from .launch import KeyedKernel, aligned16, cdiv, next_power_of_2

@dataclass(frozen=True)
class RowBlocking:
    block: int  # elements of one row per chunk (a power of two)
    rows: int  # rows per program (a power of two; 1 when the row needs more than one chunk)
    fused: bool  # the whole row is one chunk
    num_warps: int
    # Chunks per program where a kernel may split a row (row_sum: partial sums added in row order by a second
    # row_sum); 0: one program per row.
    piece: int = 0


@dataclass(frozen=True)
class PackedWarps:
    """Warps of a program that holds ``elements`` row elements: one per ``per_warp`` of them, within [least, most]."""

    per_warp: int
    least: int
    most: int

    def __call__(self, elements: int) -> int:
        return min(self.most, max(self.least, elements // self.per_warp))


@dataclass(frozen=True)
class RowPolicy:
    """How a backend blocks rows; every field is a constant, so a row's blocking is a function of its length."""

    fused_max: int  # rows up to this length are one chunk, kept on chip between reduction and output
    tile_elements: int  # shorter rows are packed [ROWS, BLOCK] into one program up to this many elements
    warps: PackedWarps  # warps of a packed program
    centred_warps: PackedWarps  # the same for the kernels that centre a row on its mean first (LayerNorm, var_mean)
    loop: RowBlocking  # longer rows: one program each, looping over chunks
    split: RowBlocking  # longer rows where the kernel may cut a row into pieces (row_sum)


ROW_POLICIES = {
    # Registers hold 16384 fp32 per program (16 warps x 32 per thread). Longer rows (vocab logits) loop over
    # chunks of 16384, 16 per thread of 32 warps: one program per SM, so that few rows are in flight and most of
    # softmax's row is still in L1 for its second read (softmax.py). row_sum cuts them into pieces of 2 chunks,
    # one program (8 warps) each, and sums the pieces' partial sums in row order: a full reduction (x.sum(): one
    # row) then runs on every SM, not one: 4096 x 151936 bf16 in one row at 3046 GB/s instead of 40 (H100); vocab
    # rows stay within 4% of one 32-warp program per row (docs/lab-log.md, "row_sum cuts long rows into pieces").
    # Packed programs: 8 warps up to 4096 elements, 16 above (4096-wide rows on the H100: as fast as 16 warps or up
    # to 1.2x faster, for every row op). The centring kernels hold two reductions' live values: 4 warps up to 4096
    # elements, 8 at 8192 (H100, benchmarks/rows.py --ops layer_norm, 2026-12-06: 1.1-1.4x faster than 8-16 warps at
    # widths 768-1024 and 8192, 2048-8192 rows, docs/benchmarks.md "Row reductions").
    Backend.CUDA: RowPolicy(fused_max=16384, tile_elements=2048, warps=PackedWarps(512, 8, 16),
                            centred_warps=PackedWarps(1024, 4, 16),
                            loop=RowBlocking(16384, 1, False, 32), split=RowBlocking(16384, 1, False, 8, piece=2)),
    # A vector core's unified buffer holds 96 KB with double buffering on: chunks of 4096 keep every row kernel's
    # live tiles at 24-48 KB by the compile check's estimate (16384 took 192 KB), and a Qwen3-8B hidden row (4096)
    # is still one chunk, read once. Pieces are 32768 elements, as on CUDA. Warps do not exist there.
    Backend.ASCEND: RowPolicy(fused_max=4096, tile_elements=4096, warps=PackedWarps(1, 1, 1),
                              centred_warps=PackedWarps(1, 1, 1),
                              loop=RowBlocking(4096, 1, False, 1), split=RowBlocking(4096, 1, False, 1, piece=8)),
}


def row_blocking(n_cols: int, split: bool = False, backend: Backend = Backend.CUDA,
                 centred: bool = False) -> RowBlocking:
    """Launch config for rows of length ``n_cols`` on ``backend``, for a kernel that can (``split``) or cannot split
    a row across programs, and that does or does not centre a row on its mean (``centred``). It depends on ``n_cols``
    only, never on the number of rows: this is what fixes the reduction order of a row whatever batch it comes in."""
    policy = ROW_POLICIES[backend]
    if n_cols > policy.fused_max:
        return policy.split if split else policy.loop
    block = next_power_of_2(max(n_cols, 1))
    rows = max(1, policy.tile_elements // block)
    warps = policy.centred_warps if centred else policy.warps
    return RowBlocking(block, rows, True, num_warps=warps(block * rows))


def row_programs(n_tiles: int, device: torch.device) -> int:
    """Programs of a row kernel with ``n_tiles`` tiles (row tiles or pieces); each loops over its share."""
    device_target = target(device)
    return device_target.programs(n_tiles, device_target.vector_cores)


@dataclass(frozen=True)
class RowGrid:
    """Rows of one or more ``[..., N]`` tensors of equal shape: ``n_rows`` rows, row r at element offset
    ``(r // n_inner) * outer + (r % n_inner) * inner`` with ``(outer, inner) = strides[i]`` in tensor i."""

    n_rows: int
    n_inner: int
    strides: tuple[tuple[int, int], ...]


# Triton specialises pointers on 16-byte alignment and ints on divisibility by 16, and picks the vector width
# of a load from that, which decides which thread holds which elements, hence the order of tl.sum.
ALIGN = 16


def _merged_stride(sizes: tuple[int, ...], strides: tuple[int, ...]) -> int | None:
    """Stride of ``sizes`` merged into one dim (0 if it has no dim above size 1), None if they do not merge."""
    dims = [(n, s) for n, s in zip(sizes, strides) if n != 1]
    if any(outer != inner * n for (_, outer), (n, inner) in zip(dims, dims[1:])):
        return None
    return dims[-1][1] if dims else 0


# What row_grid reads of a tensor: (shape, strides, data_ptr % ALIGN). A fresh copy is contiguous and aligned.
RowMeta = tuple[tuple[int, ...], tuple[int, ...], int]


def _split_strides(meta: RowMeta, split: int) -> tuple[int, int] | None:
    """(outer, inner) strides of the leading dims merged into [:split] and [split:], or None."""
    shape, strides, _ = meta
    lead, lead_strides = shape[:-1], strides[:-1]
    outer = _merged_stride(lead[:split], lead_strides[:split])
    inner = _merged_stride(lead[split:], lead_strides[split:])
    return None if outer is None or inner is None else (outer, inner)


def _fresh_meta(meta: RowMeta) -> RowMeta:
    shape = meta[0]
    strides = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return shape, strides, 0


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """A new contiguous, allocator-aligned copy (``.contiguous()`` would keep a misaligned contiguous view)."""
    return t.clone(memory_format=torch.contiguous_format)


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its data is 16-byte aligned, else an aligned copy: for operands that are not rows
    (the RMSNorm weight), so that their loads always compile the same way."""
    return t if t.data_ptr() % ALIGN == 0 else _fresh(t)


def row_grid(*tensors: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], RowGrid]:
    """Describe the rows of ``tensors`` (same shape ``[..., N]``, N >= 1 dims) for a row kernel.

    A tensor is replaced by a fresh contiguous copy where no two strides reach its rows (its last dim is not
    unit-stride, its leading dims break in two places, or two tensors break at different dims), and, when N
    is a multiple of 16, where its rows are not all 16-byte aligned. The second rule makes the compiler's
    alignment view of a row a function of N alone (together with ``row_offsets``, which caps it at N's for
    any strides), so the same row gets the same vector width, hence the same sum order, in any batch and
    any buffer. Costs a copy only for misaligned views, which models do not make.
    The decisions are a function of the tensors' metadata, cached (``_row_plan``): a call with a layout seen
    before costs a dictionary lookup.
    """
    copies, grid = _row_plan(tuple((t.shape, t.stride(), t.data_ptr() % ALIGN) for t in tensors))
    if any(copies):
        tensors = tuple(_fresh(t) if copy else t for t, copy in zip(tensors, copies))
    return tensors, grid


def row_grid_in_place(*tensors: torch.Tensor) -> RowGrid | None:
    """``row_grid``'s grid for tensors of these shapes and strides whose data is 16-byte aligned, where it reads
    them in place; None where it would copy one. From metadata only, so a launch planned once per layout."""
    copies, grid = _row_plan(tuple((tuple(t.shape), t.stride(), 0) for t in tensors))
    return None if any(copies) else grid


@functools.lru_cache(maxsize=8192)
def _row_plan(metas: tuple[RowMeta, ...]) -> tuple[tuple[bool, ...], RowGrid]:
    """``row_grid``'s decisions from the tensors' metadata: which tensors to copy, and the rows' grid."""
    copies = [False] * len(metas)
    metas = list(metas)

    def copy(i: int) -> None:
        copies[i], metas[i] = True, _fresh_meta(metas[i])

    for i, (shape, strides, _) in enumerate(metas):
        unit_rows = shape[-1] <= 1 or strides[-1] == 1
        if not (unit_rows and any(_split_strides(metas[i], k) is not None for k in range(len(shape)))):
            copy(i)
    n_lead = len(metas[0][0]) - 1
    while True:
        # Prefer the largest split: a tensor whose rows have one stride then gets n_inner = 1.
        for split in range(n_lead, -1, -1):
            strides = [_split_strides(meta, split) for meta in metas]
            if all(s is not None for s in strides):
                break
        else:  # the tensors break at different dims: read the first in place, the rest contiguous
            for i in range(1, len(metas)):
                copy(i)
            continue
        n_cols = metas[0][0][-1]
        if n_cols and n_cols % ALIGN == 0:
            misaligned = [i for i, (meta, (outer, inner)) in enumerate(zip(metas, strides))
                          if meta[2] or outer % ALIGN or inner % ALIGN]
            if misaligned:
                for i in misaligned:
                    copy(i)
                continue
        shape = metas[0][0]
        return tuple(copies), RowGrid(math.prod(shape[:-1]), math.prod(shape[split:-1]), tuple(strides))


@triton.jit
def row_offsets(rows, n_rows, n_cols, n_inner, stride_outer, stride_inner):
    """Element offsets (int64) of ``rows`` in a tensor laid out as described by ``RowGrid``."""
    wide = rows.to(tl.int64)
    offsets = wide // n_inner * stride_outer + wide % n_inner * stride_inner
    # + 0 for every row that exists: this caps the alignment the compiler can prove for a row at what n_cols
    # gives, so strided or single-row inputs get the vector width (and sum order) of a contiguous batch.
    return offsets + (rows >= n_rows).to(tl.int64) * n_cols


@triton.jit(do_not_specialize=["n_rows"])
def _row_sum_kernel(
    x_ptr, out_ptr, n_rows, n_cols, n_inner, stride_outer, stride_inner, divisor,
    SUMMAND: tl.constexpr, MEAN: tl.constexpr, SQUARE: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
    PIECE: tl.constexpr,
):
    """out[r] = sum_j x[r, j] (MEAN: / divisor; SQUARE: of x[r, j] ** 2), each element first cast to SUMMAND as
    aten casts to the output dtype, fp32 sums in chunks of BLOCK, folded by one tl.sum. Program p takes the
    tiles p, p + programs, ... (one each on CUDA).

    PIECE > 0 (then ROWS == 1): tile t sums chunks [PIECE * k, PIECE * (k + 1)) of row t // n_pieces, with
    k = t % n_pieces, into out[t]: the partial sums of a row, in row order."""
    n_pieces = tl.cdiv(n_cols, PIECE * BLOCK) if PIECE else 1
    n_tiles = n_rows * n_pieces if PIECE else tl.cdiv(n_rows, ROWS)
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        if PIECE:
            rows = tile // n_pieces + tl.arange(0, 1)
            first = tile % n_pieces * (PIECE * BLOCK)
            end = tl.minimum(first + PIECE * BLOCK, n_cols)
            outs = tile + tl.arange(0, 1).to(tl.int64)
        else:
            rows = tile * ROWS + tl.arange(0, ROWS)
            first, end = 0, n_cols
            outs = rows.to(tl.int64)
        row_mask = rows < n_rows
        x_rows = x_ptr + row_offsets(rows, n_rows, n_cols, n_inner, stride_outer, stride_inner)[:, None]
        cols = tl.arange(0, BLOCK)[None, :]
        acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        for start in range(first, end, BLOCK):
            mask = row_mask[:, None] & (start + cols < end)
            x = tl.load(x_rows + start + cols, mask=mask, other=0.0)
            x = x.to(SUMMAND).to(tl.float32)
            if SQUARE:
                x = x * x
            acc += x
        total = tl.sum(acc, axis=1)
        if MEAN:
            total = total / divisor
        tl.store(out_ptr + outs, total.to(out_ptr.dtype.element_ty), mask=row_mask)


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    return getattr(tl, str(dtype).removeprefix("torch."))


def row_sum(x: torch.Tensor, out_dtype: torch.dtype, mean: bool = False, square: bool = False, *,
            blocking: RowBlocking | None = None) -> torch.Tensor:
    """Sum (or mean) of ``x`` [..., R] (``square``: of its squares) over its last dim -> fresh contiguous [...]
    in ``out_dtype``.

    As aten's sum/mean with ``dtype=``: each element is cast to ``out_dtype`` (then squared), the sum is
    accumulated in fp32. A blocking that splits rows (``RowBlocking.piece``) sums the pieces of each row in fp32
    first, then sums those partial sums as rows of their own (with their own blocking, split again if they are
    that many). ``blocking`` overrides ``row_blocking(R, split=True)`` for the first level, for
    benchmarks/rows.py's search.
    """
    out = torch.empty(x.shape[:-1], dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out
    (x,), grid = row_grid(x)
    n_cols, summand = x.shape[-1], out_dtype
    backend = target(x.device).backend
    cfg = blocking or row_blocking(n_cols, split=True, backend=backend)
    while cfg.piece:
        pieces = torch.empty(grid.n_rows, cdiv(x.shape[-1], cfg.piece * cfg.block), dtype=torch.float32,
                             device=x.device)
        _launch_row_sum(x, grid, pieces, summand, False, square, 1, cfg)
        x, grid = pieces, RowGrid(grid.n_rows, 1, ((pieces.shape[1], 0),))
        summand, square, cfg = torch.float32, False, row_blocking(pieces.shape[1], split=True, backend=backend)
    _launch_row_sum(x, grid, out, summand, mean, square, n_cols, cfg)
    return out


@dataclass(frozen=True, eq=False)
class RowLaunch:
    """A row kernel's launch worked out from metadata once (grid, ints, constexprs and launch options): a launch
    with a layout seen before reads only the data pointers. Hashed by identity: the plan is the first part of its
    launches' key (kernels/launch.py), and the cached planners return the same plan for the same layout."""

    device: torch.device
    out_shape: tuple[int, ...]
    out_dtype: torch.dtype
    grid: tuple[int]
    ints: tuple[int, ...]
    meta: dict


@functools.lru_cache(maxsize=8192)
def _row_sum_plan(device: torch.device, n_cols: int, grid: RowGrid, out_shape: tuple[int, ...], out_dtype: torch.dtype,
                  summand: torch.dtype, mean: bool, square: bool, divisor: int, cfg: RowBlocking) -> RowLaunch:
    """A tile per ``cfg.rows`` elements of the output: rows, or pieces of rows."""
    (stride_outer, stride_inner), = grid.strides
    ints = (grid.n_rows, n_cols, grid.n_inner, stride_outer, stride_inner, divisor)
    programs = row_programs(cdiv(math.prod(out_shape), cfg.rows), device)
    meta = dict(SUMMAND=tl_dtype(summand), MEAN=mean, SQUARE=square, BLOCK=cfg.block, ROWS=cfg.rows, PIECE=cfg.piece,
                **launch_options(target(device).backend, cfg.num_warps))
    return RowLaunch(device, out_shape, out_dtype, (programs,), ints, meta)


def launch_row_sum(plan: RowLaunch, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Run ``plan`` on ``x`` (rows with the plan's layout) into ``out``, or into a fresh tensor of the plan's shape."""
    if out is None:
        out = torch.empty(plan.out_shape, dtype=plan.out_dtype, device=plan.device)
    # The launch key (kernels/launch.py): the plan fixes every constexpr and int; out is fresh.
    _row_sum_launch(plan.device, (plan, x.dtype, aligned16(x)), plan.grid, x, out, *plan.ints, **plan.meta)
    return out


def plan_row_sum(rows: torch.Tensor, device: torch.device, out_dtype: torch.dtype, mean: bool, square: bool,
                 out_shape: tuple[int, ...]) -> RowLaunch | None:
    """``row_sum``'s launch on ``device`` for rows with the shape and strides of ``rows`` [..., R], where one launch reads the rows in place
    (16-byte aligned data, a layout ``row_grid`` takes without a copy, rows of one piece) and writes a fresh
    ``out_shape``; else None, and the caller takes ``row_sum``."""
    n_cols = rows.shape[-1]
    cfg = row_blocking(n_cols, split=True, backend=target(device).backend)
    grid = row_grid_in_place(rows)
    if grid is None or cfg.piece or not n_cols or not math.prod(out_shape):
        return None
    return _row_sum_plan(device, n_cols, grid, tuple(out_shape), out_dtype, out_dtype, mean, square, n_cols, cfg)


def _launch_row_sum(x, grid: RowGrid, out, summand, mean, square, divisor, cfg: RowBlocking) -> None:
    plan = _row_sum_plan(x.device, x.shape[-1], grid, tuple(out.shape), out.dtype, summand, mean, square, divisor, cfg)
    launch_row_sum(plan, x, out)


_row_sum_launch = KeyedKernel(_row_sum_kernel)
