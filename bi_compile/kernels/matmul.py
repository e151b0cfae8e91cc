"""Batch-invariant matrix product: one Triton kernel behind bi::mm, bi::addmm, bi::bmm and bi::linear.

    C[b] = alpha * (A[b] @ B[b]) + beta * bias[b]        A [batch, M, K], B [batch, K, N], C [batch, M, N]

Why the result of one row cannot depend on M (the number of rows in the call) or on where the row sits:

- every output element is one fp32 accumulator that walks K from 0 upwards, one ``tl.dot(a, b, acc)`` per K chunk;
  the K loop is sequential, there is no split-K or stream-K, and rows never share an accumulator. For fp16/bf16
  the tensor cores add each chunk in k16 steps, in order, into that accumulator, so the chunk length does not
  change the order: the K order is a function of K alone. (The portable table keeps one chunk per dtype,
  ``BLOCK_K``; the Hopper table streams the weight in 256-long chunks at few rows.) TMA loads and persistent
  programs change how tiles are fetched and which program computes them, not the arithmetic;
- on Ascend one tile per dtype serves every M (``ASCEND_TILES``): a cube's order for other tile shapes and chunks
  is unmeasured, so nothing that could change it follows the batch;
- the tile shape (BLOCK_M, BLOCK_N, chunk, warps, stages, loads) is picked from the real M (and N) at run time
  (``pick_tiles`` over the device's table, ``tile_table``; on CUDA); it decides which program computes an element, not
  how. On the H100, every candidate below gave the same bits (mma.sync and wgmma tiles, 64- and 256-long chunks,
  pointer and TMA loads, fp16/bf16/fp32, both B layouts, odd K), and the GPU tests check it again at every M
  where the choice changes; a candidate may only be added with them;
- fp32 inputs use ``input_precision="ieee"`` (plain FMA), never TF32, so fp32 means fp32 (and every input on
  Ascend: ``Target.dot_precision``).

Rows past M and columns past N are masked (zero-filled loads, no stores): they never reach a stored element.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .device import Backend, Target, launch_options, target
from .launch import KeyedKernel, aligned16, cdiv, emit_launch, launch_cond


@dataclass(frozen=True)
class TileConfig:
    """How the [M, N] output is cut into programs; never how K is reduced (that is ``BLOCK_K``)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    group_m: int = 8  # tiles sharing a column strip run together, so the B strip stays in L2
    block_k: int = 0  # K chunk per pipeline stage; 0: the dtype's BLOCK_K
    # Hopper's tensor memory accelerator loads the A and B tiles (out-of-bounds reads are zeros, as the masked
    # loads'), where ``tma_ready`` allows it; elsewhere the same tiles run with pointer loads.
    tma: bool = False
    # One program per processor looping over the tiles, its loop flattened so that the next tile's loads overlap
    # this tile's epilogue (CUDA; Ascend and the interpreter always loop, unflattened).
    persistent: bool = False


# The K chunk a tile loads per pipeline stage unless its TileConfig says otherwise.
BLOCK_K = {torch.float16: 64, torch.bfloat16: 64, torch.float32: 32}

# (largest M of the range, candidate tiles from small to large), ascending in M; the last range takes
# every larger M. Measured on the H100 (bf16, Qwen3 projections, M = 1..8192).
TILE_CANDIDATES: dict[torch.dtype, tuple[tuple[int, tuple[TileConfig, ...]], ...]] = {
    torch.float16: (
        # Small M streams the weight: narrow column strips give enough programs to keep the memory busy
        # without splitting K, and 6 stages keep enough bytes in flight per SM.
        (64, (TileConfig(64, 32, num_warps=4, num_stages=6), TileConfig(64, 64, num_warps=4, num_stages=6))),
        # From M = 65: 6 stages on the 64x64 tile and 4 on 128x128 measured 1.2-1.3x cuBLAS at M = 128 and
        # 512 where 4 and 3 stages gave 1.45-1.6x (benchmarks/tiles.py; docs/lab-log.md, "The portable table's
        # stages and their measurement").
        (1 << 62, (
            TileConfig(64, 64, num_warps=4, num_stages=6),
            TileConfig(64, 128, num_warps=4, num_stages=4),
            TileConfig(128, 128, num_warps=8, num_stages=4),
            TileConfig(128, 256, num_warps=8, num_stages=4),
        )),
    ),
    # fp32 runs on FMA units (IEEE): the smallest row tile wastes least work on few rows.
    torch.float32: (
        (64, (TileConfig(16, 64, num_warps=4, num_stages=3),)),
        (1 << 62, (TileConfig(64, 128, num_warps=4, num_stages=3),)),
    ),
}
TILE_CANDIDATES[torch.bfloat16] = TILE_CANDIDATES[torch.float16]

# CUDA devices with TMA (Hopper and newer). Measured on the H100 (bf16, 2026-11-23, benchmarks/tiles.py): a long K
# chunk streams the weight at few rows (0.94-1.09x cuBLAS at M <= 64), and TMA loads with persistent programs reach
# 1.00-1.09x at M >= 2048 where the pointer-load tiles stayed at 1.13-1.27x (docs/benchmarks.md, "Matmul tile
# search"; docs/lab-log.md, "TMA loads, persistent tiles and long K chunks").
HOPPER_TILE_CANDIDATES = {
    torch.float16: (
        # Up to 32 rows, 16-row tiles read the weight in 256-long chunks (rows 17-32 re-read it from L2); 33-64
        # rows take one 64-row tile (16-row tiles measured 1.3-1.8x at M = 64).
        (32, (TileConfig(16, 32, num_warps=4, num_stages=3, block_k=256),)),
        (64, (TileConfig(64, 32, num_warps=4, num_stages=4, block_k=128),)),
        (128, (TileConfig(64, 64, num_warps=4, num_stages=6), TileConfig(128, 256, num_warps=8, num_stages=4))),
        (256, (TileConfig(64, 64, num_warps=4, num_stages=6),
               TileConfig(64, 256, num_warps=4, num_stages=4, tma=True, persistent=True),
               TileConfig(128, 256, num_warps=8, num_stages=4, tma=True, persistent=True))),
        (1 << 62, (TileConfig(128, 128, num_warps=8, num_stages=4, tma=True, persistent=True),
                   TileConfig(128, 256, num_warps=8, num_stages=4, tma=True, persistent=True))),
    ),
    torch.float32: TILE_CANDIDATES[torch.float32],
}
HOPPER_TILE_CANDIDATES[torch.bfloat16] = HOPPER_TILE_CANDIDATES[torch.float16]


# Ascend (910B/A3): one tile per dtype whatever M is, so there is nothing to verify across tiles on the NPU before
# the first run; each keeps its live tiles (A and B chunks, the fp32 accumulator, the epilogue) within 96 KB of
# unified buffer, and the K chunk is the one the cube takes per step. Programs loop over tiles on num_aicore.
ASCEND_TILES = {
    torch.float16: ((1 << 62, (TileConfig(64, 128, num_warps=1, num_stages=1, block_k=128, persistent=True),)),),
    torch.float32: ((1 << 62, (TileConfig(64, 64, num_warps=1, num_stages=1, block_k=64, persistent=True),)),),
}
ASCEND_TILES[torch.bfloat16] = ASCEND_TILES[torch.float16]

# (backend, TMA) -> tile table; every candidate in a table gave the same bits on its device (the GPU tests check
# the CUDA ones).
TILE_TABLES = {
    (Backend.CUDA, False): TILE_CANDIDATES,
    (Backend.CUDA, True): HOPPER_TILE_CANDIDATES,
    (Backend.ASCEND, False): ASCEND_TILES,
}


def tile_table(device_target: Target) -> dict:
    return TILE_TABLES[device_target.backend, device_target.tma]


def pick_tiles(m: int, n: int, dtype: torch.dtype, processors: int, batch: int = 1, table: dict = TILE_CANDIDATES) -> TileConfig:
    """The tiles for this call, chosen from the real M inside the op, never at trace time.

    Among the candidates for ``m``, the one whose busiest processor streams the fewest operand rows:
    waves * (rows of A + columns of B per tile), waves = ceil(tiles / processors); ties go to the larger tile.
    """
    candidates = next(tiles for max_m, tiles in table[dtype] if m <= max_m)

    def streamed(tiles: TileConfig) -> int:
        count = batch * cdiv(m, tiles.block_m) * cdiv(n, tiles.block_n)
        return cdiv(count, processors) * (min(m, tiles.block_m) + tiles.block_n)

    return min(reversed(candidates), key=streamed)


@functools.lru_cache(maxsize=8192)
def device_tiles(m: int, n: int, dtype: torch.dtype, device_target: Target, batch: int = 1) -> TileConfig:
    """``pick_tiles`` on the target's table, cached: the launcher asks once per (M, N, ...) it meets."""
    return pick_tiles(m, n, dtype, device_target.cube_cores, batch, tile_table(device_target))


@triton.jit
def _accumulate_k(
    a_ptr, b_ptr, offs_m, offs_n, in_m, in_n, K, stride_am, stride_bk, stride_bn,
    EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """fp32 [BLOCK_M, BLOCK_N] = A[offs_m, :] @ B[:, offs_n], one tl.dot per BLOCK_K chunk from k = 0 upwards:
    the one K order of every bi matrix product. Rows outside ``in_m`` and columns outside ``in_n`` read zeros."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=in_m[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=in_n[None, :], other=0.0)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=in_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & in_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _accumulate_k_tma(
    a_desc, b_desc, first_m, first_n, K, B_UNIT_STRIDE_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``_accumulate_k`` with the tiles loaded by TMA: the same chunks in the same order, zeros past M, N and K."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = a_desc.load([first_m, k * BLOCK_K])
        if B_UNIT_STRIDE_K:
            b = b_desc.load([first_n, k * BLOCK_K]).T
        else:
            b = b_desc.load([k * BLOCK_K, first_n])
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _matmul_tile(
    tile, a_ptr, b_ptr, bias_ptr, c_ptr, M, N, K,
    stride_ab, stride_am, stride_bb, stride_bk, stride_bn, stride_biasb, stride_biasm, stride_biasn, stride_cb, stride_cm,
    alpha, beta, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr, B_UNIT_STRIDE_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Output tile number ``tile``: GROUP_M row tiles at a time down each column strip, matrix by matrix."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    tiles_per_matrix = num_pid_m * num_pid_n
    tiles_per_group = GROUP_M * num_pid_n
    batch = (tile // tiles_per_matrix).to(tl.int64)
    tile_in_matrix = tile % tiles_per_matrix
    first_m = (tile_in_matrix // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile_in_matrix % tiles_per_group) % group_rows
    pid_n = (tile_in_matrix % tiles_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_m = offs_m < M
    in_n = offs_n < N
    if TMA:  # one matrix (tma_ready)
        acc = _accumulate_k_tma(a_ptr, b_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N, K, B_UNIT_STRIDE_K, INPUT_PRECISION,
                                BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        acc = _accumulate_k(a_ptr + batch * stride_ab, b_ptr + batch * stride_bb, offs_m, offs_n, in_m, in_n,
                            K, stride_am, stride_bk, stride_bn, EVEN_K, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    # fp32 scalars from Triton's own launch; a launch Inductor emits may pass Python floats as fp64 (its
    # _use_fp64_for_unbacked_floats), rounded here to the same fp32, so the epilogue adds in fp32 either way.
    out = acc * tl.cast(alpha, tl.float32)
    mask = in_m[:, None] & in_n[None, :]
    if HAS_BIAS:
        bias_ptrs = bias_ptr + batch * stride_biasb + offs_m.to(tl.int64)[:, None] * stride_biasm + offs_n[None, :] * stride_biasn
        out += tl.cast(beta, tl.float32) * tl.load(bias_ptrs, mask=mask, other=0.0).to(tl.float32)
    c_ptrs = c_ptr + batch * stride_cb + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=mask)


# M and BATCH are not specialised (Triton would compile a variant per M % 16): every M with the same tiles
# runs one binary.
@triton.jit(do_not_specialize=["M", "BATCH"])
def _matmul_kernel(
    a_ptr, b_ptr, bias_ptr, c_ptr,
    M, N, K, BATCH,
    stride_ab, stride_am,
    stride_bb, stride_bk, stride_bn,
    stride_biasb, stride_biasm, stride_biasn,
    stride_cb, stride_cm,
    alpha, beta,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    TMA: tl.constexpr,
    B_UNIT_STRIDE_K: tl.constexpr,
    FLATTEN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """A has unit stride along K; B has unit stride along K or N (Triton specialises a stride of 1, so both
    layouts get coalesced loads from one source); C is contiguous per batch. With TMA, a_ptr and b_ptr are
    descriptors of A [M, K] and of B as [N, K] (B_UNIT_STRIDE_K) or [K, N]. Program p computes the output tiles
    p, p + programs, ... (on CUDA one each unless persistent)."""
    total = BATCH * tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    if FLATTEN:  # tl.range's flatten needs Triton >= 3.3 (not triton-ascend's): only a CUDA launch sets it
        for tile in tl.range(tl.program_id(0), total, tl.num_programs(0), flatten=True):
            _matmul_tile(tile, a_ptr, b_ptr, bias_ptr, c_ptr, M, N, K, stride_ab, stride_am, stride_bb, stride_bk, stride_bn,
                         stride_biasb, stride_biasm, stride_biasn, stride_cb, stride_cm, alpha, beta, HAS_BIAS, EVEN_K,
                         TMA, B_UNIT_STRIDE_K, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    else:
        for tile in range(tl.program_id(0), total, tl.num_programs(0)):
            _matmul_tile(tile, a_ptr, b_ptr, bias_ptr, c_ptr, M, N, K, stride_ab, stride_am, stride_bb, stride_bk, stride_bn,
                         stride_biasb, stride_biasm, stride_biasn, stride_cb, stride_cm, alpha, beta, HAS_BIAS, EVEN_K,
                         TMA, B_UNIT_STRIDE_K, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


# An operand's metadata as a plan reads it: (shape, strides).
Operand = tuple[tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True, eq=False)
class MatmulPlan:
    """What a launch needs from its operands' metadata, worked out once per layout (``plan_matmul``): a launch with
    a layout seen before reads only the data pointers. Hashed by identity: a plan is the first part of its launches'
    key (kernels/launch.py), and ``plan_matmul`` returns the same plan for the same layout."""

    device: torch.device
    dtype: torch.dtype
    out_shape: tuple[int, ...]  # a fresh contiguous output of this shape is [batch, M, N] to the kernel
    grid: tuple[int]
    ints: tuple[int, ...]  # M, N, K, BATCH and the strides, in the kernel's order
    has_bias: bool
    # The TMA descriptors' (shape, strides, block) of A and B where the tiles load with TMA and the strides allow
    # it; a launch uses them when both bases are 16-byte aligned too, else the same tiles with pointer loads.
    tma: tuple | None
    meta: dict  # the constexprs and launch options with pointer loads
    tma_meta: dict  # the same with TMA loads


@functools.lru_cache(maxsize=8192)
def plan_matmul(a: Operand, b: Operand, bias_strides: tuple[int, ...] | None, dtype: torch.dtype, device: torch.device,
                tiles: TileConfig | None = None, out_shape: tuple[int, ...] | None = None) -> MatmulPlan:
    """The launch of ``A [batch, M, K] @ B [batch, K, N] (+ bias of strides bias_strides)`` into a fresh contiguous
    ``out_shape`` (default [batch, M, N]). The tiles follow the real M: a plan is made from a call's metadata."""
    (batch, m, k), a_strides = a
    (_, _, n), b_strides = b
    device_target = target(device)
    tiles = tiles or device_tiles(m, n, dtype, device_target, batch)
    block_k = tiles.block_k or BLOCK_K[dtype]
    num_tiles = batch * cdiv(m, tiles.block_m) * cdiv(n, tiles.block_n)
    # CUDA: one program per tile, unless the tiles are persistent. Ascend wants at most one program per AI core,
    # so there (and in the interpreter) the programs loop over the tiles.
    persistent = tiles.persistent or device.type != "cuda"
    grid = min(num_tiles, device_target.cube_cores) if persistent else num_tiles
    b_unit_stride_k = b_strides[1] == 1
    ints = (m, n, k, batch, a_strides[0], a_strides[1], *b_strides, *(bias_strides or (0, 0, 0)), m * n, n)
    meta = dict(
        HAS_BIAS=bias_strides is not None,
        EVEN_K=k % block_k == 0,
        TMA=False,
        B_UNIT_STRIDE_K=b_unit_stride_k,
        FLATTEN=tiles.persistent and device.type == "cuda",
        INPUT_PRECISION=device_target.dot_precision(dtype),
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=block_k,
        GROUP_M=tiles.group_m,
        **launch_options(device_target.backend, tiles.num_warps, tiles.num_stages),
    )
    # TMA describes one matrix per operand (batch 1), on Hopper or newer (or the interpreter), with 16-byte
    # aligned row strides and rows that do not overlap (no broadcast views).
    b_rows = (b_strides[2], k) if b_unit_stride_k else (b_strides[1], n)  # (row stride, row length) of B's 2-D view
    tma = None
    if (tiles.tma and batch == 1 and (device.type == "cpu" or device_target.tma)
            and all(stride >= length and stride * dtype.itemsize % 16 == 0 for stride, length in ((a_strides[1], k), b_rows))):
        b_desc = (((n, k), (b_strides[2], b_strides[1]), (tiles.block_n, block_k)) if b_unit_stride_k
                  else ((k, n), (b_strides[1], b_strides[2]), (block_k, tiles.block_n)))
        tma = (((m, k), (a_strides[1], a_strides[2]), (tiles.block_m, block_k)), b_desc)
    return MatmulPlan(device, dtype, out_shape or (batch, m, n), (grid,), ints, bias_strides is not None, tma, meta,
                      {**meta, "TMA": True})


def launch_matmul(plan: MatmulPlan, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
                  alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """Run ``plan`` on operands with its layout (any tensors whose data starts where the operands' does: a weight
    for its transposed view, say) into ``out``, a fresh tensor of ``plan.out_shape``; returns ``out``."""
    a_aligned, b_aligned = aligned16(a), aligned16(b)
    use_tma = plan.tma is not None and a_aligned and b_aligned
    a_arg, b_arg = a, b
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        (a_shape, a_strides, a_block), (b_shape, b_strides, b_block) = plan.tma
        a_arg = TensorDescriptor(a, list(a_shape), list(a_strides), list(a_block))
        b_arg = TensorDescriptor(b, list(b_shape), list(b_strides), list(b_block))
    # The launch key (kernels/launch.py): the plan fixes every constexpr and int; out is fresh, so the allocator
    # aligned it.
    key = (plan, use_tma, a_aligned, b_aligned, plan.has_bias and aligned16(bias))
    _matmul_launch(plan.device, key, plan.grid, a_arg, b_arg, bias if plan.has_bias else out, out, *plan.ints,
                   alpha, beta, **(plan.tma_meta if use_tma else plan.meta))
    return out


def matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    tiles: TileConfig | None = None,
) -> torch.Tensor:
    """``alpha * (a @ b) + beta * bias`` per batch, as a new contiguous [batch, M, N] tensor in ``a.dtype``.

    a: [batch, M, K] with unit stride along K (rows and batches may be strided, batch stride 0 is fine);
    b: [batch, K, N] with unit stride along K or along N, same dtype; bias: [batch, M, N] of any strides
    (a broadcast view) or None. ``beta == 0`` ignores bias, NaNs included, as torch.addmm does.
    ``tiles`` overrides ``pick_tiles`` (tests and tuning); no tile changes the K order (a new one enters a table only
    with the bit checks of benchmarks/tiles.py and the GPU tests).
    The op layer validates inputs; this launcher assumes them valid.
    """
    has_bias = bias is not None and beta != 0.0
    plan = plan_matmul((a.shape, a.stride()), (b.shape, b.stride()), bias.stride() if has_bias else None,
                       a.dtype, a.device, tiles)
    out = torch.empty(plan.out_shape, device=a.device, dtype=a.dtype)
    return launch_matmul(plan, a, b, bias, out, alpha, beta) if out.numel() else out


def plan_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> MatmulPlan | None:
    """The plan of ``input [..., K] @ weight[N, K].T + bias[N]`` from the tensors' metadata (never their data):
    the leading dims of input merge into the rows of one matrix, or of a batch of them, whichever the strides
    allow, and the weight is read in place as B = weight.t() (batch stride 0). None where the leading dims merge
    into neither (a sliced 4-D input, say): the caller passes a contiguous copy, which changes no value."""
    shape, strides = input.shape, input.stride()
    k, rows = shape[-1], shape[:-1].numel()
    meta = torch.empty_strided(shape, strides, dtype=input.dtype, device="meta")
    leads = [(1, rows)] + ([(shape[:-2].numel(), shape[-2])] if len(shape) > 2 else [])
    for lead in leads:
        try:
            a = meta.view(*lead, k)
            break
        except RuntimeError:
            continue
    else:
        return None
    batch, n = a.shape[0], weight.shape[0]
    b_strides = (0, weight.stride(1), weight.stride(0))
    bias_strides = None if bias is None else (0, 0, bias.stride(0))
    return plan_matmul((tuple(a.shape), a.stride()), ((batch, k, n), b_strides), bias_strides, input.dtype,
                       input.device, out_shape=(*shape[:-1], n))


def launch_linear(plan: MatmulPlan, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Run ``plan_linear``'s plan: a fresh contiguous [..., N] in input's dtype."""
    out = torch.empty(plan.out_shape, device=plan.device, dtype=plan.dtype)
    return launch_matmul(plan, input, weight, bias, out) if out.numel() else out


_matmul_launch = KeyedKernel(_matmul_kernel)


# The M at which a native launch picks the tiles of the table's last, unbounded range (pick_tiles weighs the
# candidates by the waves they make at that M; a row's bits do not depend on which one runs).
NATIVE_LARGE_M = 8192


def native_tile_ranges(n: int, dtype: torch.dtype, device_target: Target) -> list[tuple[int, TileConfig]]:
    """(largest M, tiles) per range of the device's tile table: ``pick_tiles`` at the range's largest M (the last
    range's at NATIVE_LARGE_M), one tile per range, so that a graph holds one launch per range."""
    table = tile_table(device_target)
    return [(max_m, pick_tiles(min(max_m, NATIVE_LARGE_M), n, dtype, device_target.cube_cores, table=table))
            for max_m, _ in table[dtype]]


def emit_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``input [..., K] @ weight[N, K].T + bias[N]`` as launches that Inductor emits itself (``launch.emit_launch``),
    for a graph being traced with contiguous operands (the weight, or its transpose: a Conv1D's [K, N] weight read
    as [N, K]) on a CUDA device and K and N static: a fresh contiguous [..., N]. The tiles follow the run-time M,
    never the trace's: one ``cond`` per range of the tile table (``native_tile_ranges``) takes the branch of the
    range M falls in when the graph runs (Inductor emits it as an ``if`` in its generated code,
    ``launch.launch_cond``), unless M is static. The K order is the one of every launch of the kernel."""
    k, n = input.shape[-1], weight.shape[0]
    ranges = native_tile_ranges(n, input.dtype, target(input.device))

    a = input.reshape(-1, k)
    m = a.shape[0]
    if isinstance(m, int):
        tiles = next(tiles for max_m, tiles in ranges if m <= max_m)
        return _emit_matmul(a, weight, bias, tiles, in_place=False).reshape(*input.shape[:-1], n)

    def branch(tiles: TileConfig):  # a tuple: Inductor lowers a cond's outputs as a sequence
        return lambda a, w, *b: (_emit_matmul(a, w, b[0] if b else None, tiles, in_place=True),)

    def choose(first: int):
        """The launch for M in ranges[first:]: that range's, or (M past it) the choice among the rest."""
        max_m, tiles = ranges[first]
        if first == len(ranges) - 1:
            return branch(tiles)
        return lambda *operands: launch_cond(m <= max_m, branch(tiles), choose(first + 1), operands)

    return choose(0)(*((a, weight) if bias is None else (a, weight, bias)))[0].reshape(*input.shape[:-1], n)


def _emit_matmul(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tiles: TileConfig, *,
                 in_place: bool) -> torch.Tensor:
    """One launch of the kernel with ``tiles``: a [M, K] contiguous and weight [N, K] contiguous or transposed
    -> a fresh [M, N] (``in_place``: inside a ``cond`` branch, ``emit_launch``'s in-place form)."""
    (m, k), n = a.shape, weight.shape[0]
    device_target = target(a.device)
    block_k = tiles.block_k or BLOCK_K[a.dtype]
    out = torch.empty((m, n), dtype=a.dtype, device=a.device)
    num_tiles = cdiv(m, tiles.block_m) * cdiv(n, tiles.block_n)
    grid = torch.sym_min(num_tiles, device_target.cube_cores) if tiles.persistent else num_tiles
    # TMA as plan_matmul allows it: a and the weight are contiguous rows of K, so 16-byte aligned row strides.
    # Inductor describes an operand as the tensor it is given, so a transposed weight (rows of N) goes without:
    # the loads differ, the products and their order do not.
    unit_stride_k = weight.stride(1) == 1
    tma = tiles.tma and device_target.tma and unit_stride_k and k * a.dtype.itemsize % 16 == 0
    written = emit_launch(
        _matmul_kernel, (grid,), {"c_ptr": out}, tiles.num_warps, tiles.num_stages, in_place=in_place,
        tma_blocks={"a_ptr": (tiles.block_m, block_k), "b_ptr": (tiles.block_n, block_k)} if tma else None,
        a_ptr=a, b_ptr=weight, bias_ptr=a if bias is None else bias,
        M=m, N=n, K=k, BATCH=1, stride_ab=m * k, stride_am=k, stride_bb=0, stride_bk=weight.stride(1),
        stride_bn=weight.stride(0), stride_biasb=0, stride_biasm=0, stride_biasn=1, stride_cb=m * n, stride_cm=n,
        alpha=1.0, beta=1.0, HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0, TMA=tma,
        B_UNIT_STRIDE_K=unit_stride_k,
        FLATTEN=tiles.persistent and a.device.type == "cuda", INPUT_PRECISION=device_target.dot_precision(a.dtype),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=block_k, GROUP_M=tiles.group_m)
    return written["c_ptr"]


# grouped_matmul's tiles per backend: the groups' sizes are data (routing), so one config per dtype; on CUDA the one
# chosen for the few rows per expert of MoE decode, on Ascend the matmul's own tile.
GROUPED_TILES = {
    Backend.CUDA: {torch.float16: TileConfig(64, 64, num_warps=4, num_stages=4),
                   torch.bfloat16: TileConfig(64, 64, num_warps=4, num_stages=4),
                   torch.float32: TileConfig(16, 64, num_warps=4, num_stages=3)},
    Backend.ASCEND: {dtype: table[0][1][0] for dtype, table in ASCEND_TILES.items()},
}


@triton.jit
def _grouped_matmul_tile(
    tile, a_ptr, b_ptr, ends_ptr, c_ptr, N, K, N_GROUPS, stride_am, stride_bg, stride_bk, stride_bn, stride_cm,
    EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Output tile ``tile`` = (row tile, column tile). Group g owns rows [ends[g - 1], ends[g]) (ends[-1] = 0) and
    multiplies them by B[g]. Each group's rows are cut into BLOCK_M tiles from its first row; row tile p is the
    p-th tile of all groups in group order, found by a walk over ``ends`` (device data: no host sync, so it can be
    captured in a CUDA graph). Row tiles past the last group's have nothing to do."""
    pid_m = tile // tl.cdiv(N, BLOCK_N)
    pid_n = tile % tl.cdiv(N, BLOCK_N)
    group = tl.full((), -1, tl.int32)
    first_row = tl.full((), 0, tl.int32)
    end_row = tl.full((), 0, tl.int32)
    start = tl.full((), 0, tl.int32)
    tiles_before = tl.full((), 0, tl.int32)
    for g in range(0, N_GROUPS):
        end = tl.load(ends_ptr + g)
        tiles = tl.cdiv(tl.maximum(end - start, 0), BLOCK_M)
        hit = (pid_m >= tiles_before) & (pid_m < tiles_before + tiles)
        group = tl.where(hit, g, group)
        first_row = tl.where(hit, start + (pid_m - tiles_before) * BLOCK_M, first_row)
        end_row = tl.where(hit, end, end_row)
        tiles_before += tiles
        start = tl.maximum(start, end)
    if group >= 0:
        offs_m = first_row + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        in_m = offs_m < end_row
        in_n = offs_n < N
        acc = _accumulate_k(a_ptr, b_ptr + group.to(tl.int64) * stride_bg, offs_m, offs_n, in_m, in_n,
                            K, stride_am, stride_bk, stride_bn, EVEN_K, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])


@triton.jit(do_not_specialize=["N_GROUPS", "TILES"])
def _grouped_matmul_kernel(
    a_ptr, b_ptr, ends_ptr, c_ptr,
    N, K, N_GROUPS, TILES,
    stride_am, stride_bg, stride_bk, stride_bn, stride_cm,
    EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program p computes the output tiles p, p + programs, ... of TILES (one each on CUDA)."""
    for tile in range(tl.program_id(0), TILES, tl.num_programs(0)):
        _grouped_matmul_tile(tile, a_ptr, b_ptr, ends_ptr, c_ptr, N, K, N_GROUPS, stride_am, stride_bg, stride_bk,
                             stride_bn, stride_cm, EVEN_K, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)


def grouped_matmul(a: torch.Tensor, b: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows [ends[g - 1], ends[g]) of ``a`` [T, K] times ``b[g]`` [K, N], for each group g, as a new contiguous
    [T, N] tensor in ``a.dtype``; rows past ``ends[-1]`` are zero. ``a`` has unit stride along K, ``b`` [G, K, N]
    unit stride along K or N, ``ends`` [G] int32 non-decreasing (as torch._grouped_mm's ``offs``).
    A row's bits depend only on the row and its group's matrix: its tile is cut from its group's first row, but
    rows are independent in ``tl.dot`` and K runs in the one order of ``_accumulate_k``."""
    t, k = a.shape
    groups, _, n = b.shape
    out = torch.zeros((t, n), device=a.device, dtype=a.dtype)
    if out.numel() == 0 or groups == 0:
        return out
    device_target = target(a.device)
    tiles = GROUPED_TILES[device_target.backend][a.dtype]
    block_k = tiles.block_k or BLOCK_K[a.dtype]
    # Each group adds at most one partial tile: cdiv(T, BLOCK_M) + G row tiles cover any routing.
    num_tiles = (cdiv(t, tiles.block_m) + groups) * cdiv(n, tiles.block_n)
    grid = min(num_tiles, device_target.cube_cores) if tiles.persistent else num_tiles
    _grouped_matmul_kernel[(grid,)](
        a, b, ends, out,
        n, k, groups, num_tiles,
        a.stride(0), b.stride(0), b.stride(1), b.stride(2), out.stride(0),
        EVEN_K=k % block_k == 0,
        INPUT_PRECISION=device_target.dot_precision(a.dtype),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=block_k,
        **launch_options(device_target.backend, tiles.num_warps, tiles.num_stages),
    )
    return out
