"""Batch-invariant scaled-dot-product attention (Triton), the kernel behind ``bi::attention``.

For one query row q (scores s_j = scale * q.k_j + bias_j, -inf where a key is masked):

    out = sum_j softmax(s)_j v_j

**Reduction order.** A row's keys are cut, from key 0, into splits of ``SPLIT_N`` keys and each split into
chunks of ``BLOCK_N`` keys. Inside a split, an online softmax (fp32 running max m, sum l, accumulator acc)
takes the chunks in order; the split states are then merged in order, starting from the empty state:

    (m, l, acc) <- merge((m, l, acc), split_0), merge(..., split_1), ...

It runs in log2 units: each score is multiplied once by ``scale * log2(e)`` (an additive mask by ``log2(e)``), m
is the max of those, and every exponential is an ``exp2``, in the chunks, the merge and the split states the
workspace holds alike.

This tree is fixed by the key positions and ``(head dim, dtype)`` (the config table below): never by the
batch, the number of heads, the query length or the row's place in the batch. Every sum in it is a ``tl.dot``
(l too, as ``p @ ones``), which adds in its instruction's order, or a max, which is exact: a ``tl.sum`` would
add in the order of the register layout the compiler picks, and that follows the loads' vector widths, i.e.
the strides and alignment of the call (a bool mask with S = 4096 summed l unlike one with S = 1497).

The merges run either in the same program, right after each split (``split_kv=False``), or, when there are
too few (sequence, kv head, query tile) programs to fill the GPU (small-batch decode on a long cache), in
one program per split that writes its state to a workspace, followed by a merge kernel that folds the
states in the same order. Both ways execute the same ``_attend_split`` / ``_merge`` / ``_finish`` code with
the same operands, and the merge pins its multiply-adds with ``tl.fma`` so the compiler cannot contract them
differently in the two kernels: the choice changes the schedule, not the bits (tests compare the two on the
GPU).

**Rows.** A program owns one (sequence, kv head) and ``BLOCK_M`` packed query rows ``r = position * G + g``
(G = H / Hkv query heads share a kv head: GQA/MQA decode fills the tile with the group). Rows of a tile are
independent in ``tl.dot``; ``BLOCK_M`` is fixed per config, so the query length only changes how many tiles
there are (128 rows on CUDA for fp16/bf16 up to head dim 128, 64 otherwise). It must not follow the query
length: a chunked prefill pads every sequence to the batch's longest chunk, so q_len depends on the other
sequences, and on the H100 a 16-row tile (mma.sync) gave other bf16 bits than the 64-row one (wgmma) for head dim
128, G = 4 (measured 2026-11-23; they agreed for head dim 64, G = 2).

**Masked keys are exact no-ops**: a masked key gets weight 0 and leaves m alone, so a chunk or split whose keys
are all masked for a row leaves (m, l, acc) bit-identical (exp2(0) = 1). So causal tiles stop at their last
visible key, and a static KV cache of any length S gives the same bits as long as the slots past a sequence's
length are masked: the chunks are anchored at key 0, whatever S is. It also lets the chunks that every row of a
tile sees in full (below kv_len and below the tile's first row on the causal diagonal, with no explicit mask)
skip the bounds, causal and mask tests: the unmasked step does what the masked one does for a visible key, with
the exponent pinned as one ``tl.fma`` in both (as the merge pins its own), so which step takes a chunk, which
depends on the row's tile, changes no bit of the row.

Fully masked rows (l = 0) give 0, as torch's CPU SDPA does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.fx.experimental.symbolic_shapes import sym_and

from .device import Backend, Target, launch_options, target
from .launch import KeyedKernel, aligned16, cdiv, emit_launch, launch_cond, next_power_of_2

MASK_NONE, MASK_BOOL, MASK_ADDITIVE = 0, 1, 2

# An operand's metadata as a plan reads it: (shape, strides).
Operand = tuple[tuple[int, ...], tuple[int, ...]]

# Split mode writes (Dv + 2) fp32 per query row and split; beyond this it is not worth the memory.
MAX_WORKSPACE_BYTES = 256 << 20
# Query rows per program of the merge kernel: it is elementwise per row, so any tile gives the same bits.
MERGE_BLOCK_M = 16
# Columns of the row-sum dot p @ ones (tl.dot's smallest N).
ROW_SUM_N = tl.constexpr(16)
# The softmax runs in log2 units (exp2, with scale * log2(e) folded into the scores).
LOG2E = tl.constexpr(1.4426950408889634)
# Finite additive masks are clamped here before that scaling (anything below it is masked-but-finite alike).
MIN_BIAS = tl.constexpr(-2e38)


@dataclass(frozen=True)
class AttentionConfig:
    block_m: int  # packed query rows per program
    block_n: int  # keys per online-softmax step
    split_n: int  # keys per split (a multiple of block_n)
    num_warps: int
    num_stages: int

    def __post_init__(self):
        if self.split_n % self.block_n:
            raise ValueError(f"bi::attention: a split of {self.split_n} keys is not a whole number of "
                             f"{self.block_n}-key chunks ({self})")


# Per backend, keyed by (padded head dim, fp32?): the whole reduction order of a row follows from this entry.
# CUDA: blocks chosen so that ptxas (sm_90a) keeps the unmasked single-program schedule, which holds two
# accumulators, within 255 registers with at most ~128 bytes of spills, none in the chunk loops. fp16/bf16 up to head
# dim 128 take 128-row tiles on 8 warps (a warpgroup's wgmma per 64 rows): 100 bytes of spill stores at head dim 128,
# none at 64. Head dim 256 and fp32 (tl.dot on FMAs) keep 64 rows: at 128 they spill 1.3 KB and 30 KB. fp32 at head
# dim 256 takes 32 rows: at 64 it spilled 21.8 KB. Its dots run on FMAs, which add over k in order whatever the tile
# height. A mask costs registers too: 0.8-1 KB of spills at head dim 128 with 128 rows. Every variant's spills, as
# Triton 3.6 compiles it, are in tests/cuda_spill_stores.json, which CI holds them to (tests/cuda_compile_check.py).
# Splits of 512 keys: each split restarts the load pipeline, so short splits cost bandwidth in the single-program
# schedule, long ones cost parallelism in the split-KV one (B = 1, Hkv = 8, S = 8192: 128 programs).
# Ascend: q, both fp32 accumulators (the split's and the merged one), a K and a V chunk and the chunk's scores
# within 96 KB of unified buffer at every head dim up to 256: 84 KB at head dim 128, 79 KB at 256, by the compile
# check's estimate (vllm-ascend's BI attention takes 64-row blocks, 32 above head dim 128, which that estimate puts
# at 105-170 KB once the merged accumulator is counted).
ATTENTION_CONFIGS = {
    Backend.CUDA: {
        (64, False): AttentionConfig(128, 64, 512, 8, 3),
        (128, False): AttentionConfig(128, 64, 512, 8, 3),
        (256, False): AttentionConfig(64, 32, 512, 8, 2),
        (64, True): AttentionConfig(64, 32, 512, 8, 2),
        (128, True): AttentionConfig(64, 32, 512, 8, 2),
        (256, True): AttentionConfig(32, 16, 512, 8, 2),
    },
    Backend.ASCEND: {
        (64, False): AttentionConfig(32, 64, 512, 1, 1),
        (128, False): AttentionConfig(32, 32, 512, 1, 1),
        (256, False): AttentionConfig(16, 32, 512, 1, 1),
        (64, True): AttentionConfig(32, 64, 512, 1, 1),
        (128, True): AttentionConfig(32, 32, 512, 1, 1),
        (256, True): AttentionConfig(16, 32, 512, 1, 1),
    },
}


def head_block(dim: int) -> int:
    """Padded block for a head dim: a power of two, at least 16 (the smallest ``tl.dot`` operand)."""
    return max(16, next_power_of_2(dim))


def attention_config(head_dim: int, value_dim: int, dtype: torch.dtype, backend: Backend = Backend.CUDA,
                     configs: dict = ATTENTION_CONFIGS) -> AttentionConfig:
    """The config for head dims up to 256 from ``configs`` (a table like ``ATTENTION_CONFIGS``); 16 and 32 share
    the 64 entry (same order, smaller blocks)."""
    return configs[backend][(max(64, head_block(max(head_dim, value_dim))), dtype == torch.float32)]


@triton.jit
def _softmax_step(s, visible, bias, v, m, l, acc, ones, qk_scale,
                  MASKED: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One chunk of the online softmax, in log2 units: raw scores s = q . k, scaled by qk_scale = scale * log2(e)
    (plus bias, an additive mask times log2(e)), so that exp2 gives the exponentials. MASKED: keys where
    ``visible`` is false get no weight; an unmasked step (every key visible to every row, no bias) computes the
    same bits for its keys as a masked one, the where aside: the exponent is one pinned fma in both (a separate
    multiply and subtract could be contracted to an fma in one and not in the other)."""
    t = tl.fma(s, qk_scale, bias) if HAS_BIAS else s * qk_scale
    if MASKED:
        t = tl.where(visible, t, float("-inf"))
    m_new = tl.maximum(m, tl.max(t, 1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf while a row has seen no key
    alpha = tl.exp2(m - shift)
    # With a bias, t is an fma's result (nothing to contract) and holds the bias as rounded for the max: scores
    # that a huge bias absorbs stay equal, as in SDPA. Without one, the fma pins s * qk_scale - shift.
    p = tl.exp2(t - shift[:, None] if HAS_BIAS else tl.fma(s, qk_scale, -shift[:, None]))
    if MASKED:
        p = tl.where(visible, p, 0.0)
    p = p.to(ones.dtype)
    l = tl.dot(p, ones, l * alpha[:, None], input_precision=DOT_PRECISION)
    acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l, acc


@triton.jit
def _attend_chunk(
    q, first, m, l, acc, ones, k_base, v_base, mask_base, mask_rows, q_pos, row_valid,
    stride_ks, stride_kd, stride_vs, stride_vd, stride_ms, kv_len, qk_scale,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """The keys [first, first + BLOCK_N) into (m, l, acc). Unless MASKED, every key is below kv_len and visible
    to every row of the tile: no bounds, causal or mask tests."""
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    keys = first + tl.arange(0, BLOCK_N)
    key_valid = keys < kv_len
    if MASKED:
        k_t = tl.load(k_base + keys[None, :] * stride_ks + d[:, None] * stride_kd,
                      mask=key_valid[None, :] & (d[:, None] < HEAD_DIM), other=0.0)
        v = tl.load(v_base + keys[:, None] * stride_vs + dv[None, :] * stride_vd,
                    mask=key_valid[:, None] & (dv[None, :] < VALUE_DIM), other=0.0)
    else:
        k_t = tl.load(k_base + keys[None, :] * stride_ks + d[:, None] * stride_kd,
                      mask=d[:, None] < HEAD_DIM, other=0.0)
        v = tl.load(v_base + keys[:, None] * stride_vs + dv[None, :] * stride_vd,
                    mask=dv[None, :] < VALUE_DIM, other=0.0)
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION)
    visible = key_valid[None, :] & row_valid[:, None]
    bias = 0.0
    if MASKED:
        if IS_CAUSAL:
            visible = visible & (keys[None, :] <= q_pos[:, None])
        if MASK_KIND != 0:
            # Loaded whole, with no predicate: the keys clamped below kv_len and the rows past the queries reading
            # row 0 (``mask_rows``) keep every address in bounds, and ``visible`` discards what it must. Predicated
            # on ``visible``, the load had that predicate built in its own layout too (32 rows a thread on sm_90a),
            # and ptxas spilled 1.7 KB a thread at head dim 128; tests/cuda_spill_stores.json holds what it spills.
            mask = tl.load(mask_base + mask_rows[:, None] + tl.minimum(keys, kv_len - 1)[None, :] * stride_ms)
            if MASK_KIND == 1:
                visible = visible & (mask != 0)
            else:  # finite stays finite: an fp32 finfo.min (HF's masks) times log2(e) would overflow to -inf
                bias = mask.to(tl.float32)
                bias = tl.where(bias == float("-inf"), bias, tl.maximum(bias, MIN_BIAS) * LOG2E)
    return _softmax_step(s, visible, bias, v, m, l, acc, ones, qk_scale, MASKED, MASK_KIND == 2, DOT_PRECISION)


@triton.jit
def _attend_split(
    q, split, k_base, v_base, mask_base, mask_rows, q_pos, row_valid,
    stride_ks, stride_kd, stride_vs, stride_vd, stride_ms, kv_len, key_end, full_end, qk_scale,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online softmax over the keys of one split, chunk by chunk -> (m, l, acc) of that split alone, m in log2
    units. MASK_KIND: 0 no mask, 1 bool read as bytes (attend where != 0), 2 additive float. The chunks below
    ``full_end`` (every row of the tile sees each of their keys) take the unmasked step, the rest the masked one;
    a row gets the same bits either way, so where the cut falls changes no bit.
    l runs as [BLOCK_M, ROW_SUM_N] = sum of p @ ones (not tl.sum: see the module docstring), every column
    the same sum of the probabilities as rounded for P @ V."""
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M, ROW_SUM_N], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    ones = tl.full([BLOCK_N, ROW_SUM_N], 1.0, v_base.dtype.element_ty)
    start = split * SPLIT_N
    end = tl.minimum(start + SPLIT_N, key_end)
    unmasked_end = tl.minimum(end, start + tl.maximum(full_end - start, 0) // BLOCK_N * BLOCK_N)
    for first in range(start, unmasked_end, BLOCK_N):
        m, l, acc = _attend_chunk(
            q, first, m, l, acc, ones, k_base, v_base, mask_base, mask_rows, q_pos, row_valid,
            stride_ks, stride_kd, stride_vs, stride_vd, stride_ms, kv_len, qk_scale,
            HEAD_DIM, VALUE_DIM, MASK_KIND, IS_CAUSAL, False, BLOCK_N, BLOCK_D, BLOCK_DV, DOT_PRECISION,
        )
    for first in range(tl.maximum(unmasked_end, start), end, BLOCK_N):
        m, l, acc = _attend_chunk(
            q, first, m, l, acc, ones, k_base, v_base, mask_base, mask_rows, q_pos, row_valid,
            stride_ks, stride_kd, stride_vs, stride_vd, stride_ms, kv_len, qk_scale,
            HEAD_DIM, VALUE_DIM, MASK_KIND, IS_CAUSAL, True, BLOCK_N, BLOCK_D, BLOCK_DV, DOT_PRECISION,
        )
    return m, tl.max(l, 1), acc  # the columns of l are equal: max picks that value exactly


@triton.jit
def _merge(m, l, acc, m_split, l_split, acc_split, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Fold a split's state (m in log2 units) into the running one (explicit fma: the same rounding in both
    kernels)."""
    m_new = tl.maximum(m, m_split)
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    old = tl.exp2(m - shift)
    new = tl.exp2(m_split - shift)
    l = tl.fma(l_split, new, l * old)
    acc = tl.fma(
        acc_split, tl.broadcast_to(new[:, None], (BLOCK_M, BLOCK_DV)),
        acc * tl.broadcast_to(old[:, None], (BLOCK_M, BLOCK_DV)),
    )
    return m_new, l, acc


@triton.jit
def _store_split_state(m_part_ptr, l_part_ptr, acc_part_ptr, part, m, l, acc, rows_written,
                       VALUE_DIM: tl.constexpr, BLOCK_DV: tl.constexpr):
    """A split's fp32 state of the rows ``rows_written`` -> the workspace's rows ``part`` ([.., Dv] for acc)."""
    dv = tl.arange(0, BLOCK_DV)
    tl.store(m_part_ptr + part, m, mask=rows_written)
    tl.store(l_part_ptr + part, l, mask=rows_written)
    tl.store(acc_part_ptr + part[:, None] * VALUE_DIM + dv[None, :], acc,
             mask=rows_written[:, None] & (dv[None, :] < VALUE_DIM))


@triton.jit
def _merge_stored_split(m, l, acc, m_part_ptr, l_part_ptr, acc_part_ptr, part, row_valid,
                        BLOCK_M: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Fold the state ``_store_split_state`` wrote at rows ``part`` into the running one (``_merge``)."""
    dv = tl.arange(0, BLOCK_DV)
    m_split = tl.load(m_part_ptr + part, mask=row_valid, other=float("-inf"))
    l_split = tl.load(l_part_ptr + part, mask=row_valid, other=0.0)
    acc_split = tl.load(acc_part_ptr + part[:, None] * VALUE_DIM + dv[None, :],
                        mask=row_valid[:, None] & (dv[None, :] < VALUE_DIM), other=0.0)
    return _merge(m, l, acc, m_split, l_split, acc_split, BLOCK_M, BLOCK_DV)


@triton.jit
def _finish(out_ptr, l, acc, batch, head, q_pos, row_valid, num_heads, q_len,
            VALUE_DIM: tl.constexpr, BLOCK_DV: tl.constexpr):
    """out[batch, head, q_pos] = acc / l (out is fresh, laid out [B, L, H, Dv]); a row that saw no key
    (l = 0, acc = 0) gets 0."""
    dv = tl.arange(0, BLOCK_DV)
    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
    out_rows = ((batch * q_len + q_pos) * num_heads + head) * VALUE_DIM
    tl.store(
        out_ptr + out_rows[:, None] + dv[None, :], out.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & (dv[None, :] < VALUE_DIM),
    )


@triton.jit
def _tile_rows(pid, m_tiles, num_heads, num_kv_heads, q_len, BLOCK_M: tl.constexpr):
    """Program -> (sequence, kv head, packed rows): row r of a (sequence, kv head) is query position r // G of
    head kv_head * G + r % G."""
    pair = pid // m_tiles
    rows = (pid % m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    group = num_heads // num_kv_heads
    batch = (pair // num_kv_heads).to(tl.int64)
    kv_head = pair % num_kv_heads
    q_pos = rows // group
    head = kv_head * group + rows % group
    row_valid = rows < q_len * group
    return pair, rows, batch, kv_head, q_pos, head, row_valid


@triton.jit
def _part_rows(split, pair, rows, num_pairs, num_heads, num_kv_heads, q_len):
    """Workspace row of (split, pair, packed row): the workspace is [num_splits, pairs, q_len * G]."""
    return (split * num_pairs + pair).to(tl.int64) * (q_len * (num_heads // num_kv_heads)) + rows


@triton.jit
def _attention_tile(
    pid, q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, m_part_ptr, l_part_ptr, acc_part_ptr,
    stride_qb, stride_qh, stride_ql, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd, stride_mb, stride_mh, stride_ml, stride_ms,
    num_heads, num_kv_heads, q_len, kv_len, num_splits, m_tiles, num_pairs, qk_scale,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    WRITE_PARTIAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr, MASK_EVERY_CHUNK: tl.constexpr,
):
    """Query tile ``pid`` (of m_tiles x pairs). WRITE_PARTIAL: split program_id(1)'s state goes to the workspace
    [num_splits, pairs * q_len * G] (+ [.., Dv] for acc); else all splits, merged, and the output."""
    pair, rows, batch, kv_head, q_pos, head, row_valid = _tile_rows(
        pid, m_tiles, num_heads, num_kv_heads, q_len, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    q = tl.load(
        q_ptr + batch * stride_qb + head[:, None] * stride_qh + q_pos[:, None] * stride_ql + d[None, :] * stride_qd,
        mask=row_valid[:, None] & (d[None, :] < HEAD_DIM), other=0.0,
    )
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh
    mask_rows = batch * stride_mb + tl.where(row_valid, head * stride_mh + q_pos * stride_ml, 0)
    key_end = kv_len
    full_end = kv_len  # keys below it are visible to every row of the tile
    if IS_CAUSAL:  # stop after the tile's last visible key (later chunks would be exact no-ops)
        key_end = tl.minimum(kv_len, tl.max(tl.where(row_valid, q_pos, 0), 0) + 1)
        full_end = tl.minimum(kv_len, tl.min(q_pos, 0) + 1)
    if MASK_KIND != 0 or MASK_EVERY_CHUNK:
        full_end = 0

    if WRITE_PARTIAL:
        split = tl.program_id(1)
        m, l, acc = _attend_split(
            q, split, k_base, v_base, mask_ptr, mask_rows, q_pos, row_valid,
            stride_ks, stride_kd, stride_vs, stride_vd, stride_ms, kv_len, key_end, full_end, qk_scale,
            HEAD_DIM, VALUE_DIM, MASK_KIND, IS_CAUSAL, BLOCK_M, BLOCK_N, SPLIT_N, BLOCK_D, BLOCK_DV, DOT_PRECISION,
        )
        part = _part_rows(split, pair, rows, num_pairs, num_heads, num_kv_heads, q_len)
        _store_split_state(m_part_ptr, l_part_ptr, acc_part_ptr, part, m, l, acc, row_valid, VALUE_DIM, BLOCK_DV)
    else:
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        for split in range(0, num_splits):
            m_split, l_split, acc_split = _attend_split(
                q, split, k_base, v_base, mask_ptr, mask_rows, q_pos, row_valid,
                stride_ks, stride_kd, stride_vs, stride_vd, stride_ms, kv_len, key_end, full_end, qk_scale,
                HEAD_DIM, VALUE_DIM, MASK_KIND, IS_CAUSAL, BLOCK_M, BLOCK_N, SPLIT_N, BLOCK_D, BLOCK_DV, DOT_PRECISION,
            )
            m, l, acc = _merge(m, l, acc, m_split, l_split, acc_split, BLOCK_M, BLOCK_DV)
        _finish(out_ptr, l, acc, batch, head, q_pos, row_valid, num_heads, q_len, VALUE_DIM, BLOCK_DV)


@triton.jit(do_not_specialize=["num_heads", "num_kv_heads", "q_len", "kv_len", "num_splits", "m_tiles", "num_pairs"])
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, m_part_ptr, l_part_ptr, acc_part_ptr,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_mb, stride_mh, stride_ml, stride_ms,
    num_heads, num_kv_heads, q_len, kv_len, num_splits, m_tiles, num_pairs, scale,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    WRITE_PARTIAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr, MASK_EVERY_CHUNK: tl.constexpr,
):
    """Grid (programs, 1 or num_splits): program p takes the query tiles p, p + programs, ... of m_tiles x pairs
    (one each on CUDA). MASK_EVERY_CHUNK (tests only): the masked step for every chunk, which must not change a
    bit."""
    # Inductor passes a Python float as fp64 (Triton's own launch: fp32): the same fp32 scale either way.
    qk_scale = tl.cast(scale, tl.float32) * LOG2E
    for pid in range(tl.program_id(0), m_tiles * num_pairs, tl.num_programs(0)):
        _attention_tile(
            pid, q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, m_part_ptr, l_part_ptr, acc_part_ptr,
            stride_qb, stride_qh, stride_ql, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
            stride_vb, stride_vh, stride_vs, stride_vd, stride_mb, stride_mh, stride_ml, stride_ms,
            num_heads, num_kv_heads, q_len, kv_len, num_splits, m_tiles, num_pairs, qk_scale,
            HEAD_DIM, VALUE_DIM, MASK_KIND, IS_CAUSAL, WRITE_PARTIAL, BLOCK_M, BLOCK_N, SPLIT_N, BLOCK_D, BLOCK_DV,
            DOT_PRECISION, MASK_EVERY_CHUNK,
        )


@triton.jit(do_not_specialize=["num_heads", "num_kv_heads", "q_len", "num_splits", "m_tiles", "num_pairs"])
def _merge_splits_kernel(
    m_part_ptr, l_part_ptr, acc_part_ptr, out_ptr, num_heads, num_kv_heads, q_len, num_splits, m_tiles, num_pairs,
    VALUE_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Fold the split states written by ``_attention_kernel`` in split order and write the output; program p
    takes the tiles p, p + programs, ... of m_tiles x pairs."""
    for pid in range(tl.program_id(0), m_tiles * num_pairs, tl.num_programs(0)):
        pair, rows, batch, kv_head, q_pos, head, row_valid = _tile_rows(
            pid, m_tiles, num_heads, num_kv_heads, q_len, BLOCK_M)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        for split in range(0, num_splits):
            part = _part_rows(split, pair, rows, num_pairs, num_heads, num_kv_heads, q_len)
            m, l, acc = _merge_stored_split(m, l, acc, m_part_ptr, l_part_ptr, acc_part_ptr, part, row_valid,
                                            BLOCK_M, VALUE_DIM, BLOCK_DV)
        _finish(out_ptr, l, acc, batch, head, q_pos, row_valid, num_heads, q_len, VALUE_DIM, BLOCK_DV)


@dataclass(frozen=True, eq=False)
class AttentionPlan:
    """What a launch needs from the operands' metadata, worked out once per layout (``plan_attention``): a launch
    with a layout seen before reads only the data pointers. Hashed by identity: a plan is the first part of its
    launches' key (kernels/launch.py), and ``plan_attention`` returns the same plan for the same layout."""

    device: torch.device
    dtype: torch.dtype
    out_shape: tuple[int, int, int, int]  # [B, L, H, Dv]: the op returns it transposed to [B, H, L, Dv]
    mask_kind: int
    grid: tuple[int, int]
    ints: tuple[int, ...]
    meta: dict
    # Split KV: the fp32 partials' shapes ([splits, rows], [splits, rows, Dv]) and the merge's grid, ints and meta.
    split: tuple | None


class Schedule(NamedTuple):
    """How a call's work is cut into programs, from its sizes alone (ints, or a traced graph's symbolic sizes)."""

    cfg: AttentionConfig
    rows_per_pair: int  # packed query rows per (sequence, kv head): q_len * G
    m_tiles: int  # query tiles per (sequence, kv head)
    num_pairs: int  # (sequence, kv head) pairs
    num_splits: int  # key splits of SPLIT_N keys
    merge_tiles: int  # the merge kernel's tiles per pair
    splits_pay: bool  # split the keys over programs (then merge): the pairs' tiles alone under-fill the device
    meta: dict  # the attention kernel's constexprs but WRITE_PARTIAL, without launch options


def schedule(batch, num_heads: int, num_kv_heads: int, q_len, kv_len, head_dim: int, value_dim: int, mask_kind: int,
             is_causal: bool, dtype: torch.dtype, device_target: Target,
             config: AttentionConfig | None = None) -> Schedule:
    """The schedule of a call with these sizes; the sizes may be symbolic (``emit_attention``), and then so are
    the counts and ``splits_pay``. ``config``: a candidate in place of the table's (benchmarks/attention_tiles.py)."""
    cfg = config or attention_config(head_dim, value_dim, dtype, device_target.backend)
    rows_per_pair = q_len * (num_heads // num_kv_heads)
    m_tiles = cdiv(rows_per_pair, cfg.block_m)
    num_pairs = batch * num_kv_heads
    num_splits = cdiv(kv_len, cfg.split_n)
    workspace_bytes = num_splits * num_pairs * rows_per_pair * (value_dim + 2) * 4
    splits_pay = sym_and(num_splits > 1, m_tiles * num_pairs < 2 * device_target.cube_cores,
                         workspace_bytes <= MAX_WORKSPACE_BYTES)
    meta = dict(HEAD_DIM=head_dim, VALUE_DIM=value_dim, MASK_KIND=mask_kind, IS_CAUSAL=is_causal,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLIT_N=cfg.split_n, BLOCK_D=head_block(head_dim),
                BLOCK_DV=head_block(value_dim), DOT_PRECISION=device_target.dot_precision(dtype),
                MASK_EVERY_CHUNK=False)
    return Schedule(cfg, rows_per_pair, m_tiles, num_pairs, num_splits, cdiv(rows_per_pair, MERGE_BLOCK_M),
                    splits_pay, meta)


@functools.lru_cache(maxsize=8192)
def _plan(query: Operand, key: Operand, value: Operand, mask: tuple[torch.dtype, tuple[int, ...]] | None,
          is_causal: bool, split_kv: bool | None, dtype: torch.dtype, device: torch.device,
          config: AttentionConfig | None) -> AttentionPlan:
    (batch, num_heads, q_len, head_dim), q_strides = query
    (_, num_kv_heads, kv_len, _), k_strides = key
    value_dim = value[0][3]
    device_target = target(device)
    # A bool mask is read as bytes: the same memory, a dtype every Triton backend loads.
    mask_kind = MASK_NONE if mask is None else MASK_BOOL if mask[0] == torch.bool else MASK_ADDITIVE
    cut = schedule(batch, num_heads, num_kv_heads, q_len, kv_len, head_dim, value_dim, mask_kind, is_causal, dtype,
                   device_target, config)
    split_kv = (cut.splits_pay if split_kv is None else split_kv) and cut.num_splits > 0
    mask_strides = (0, 0, 0, 0) if mask is None else mask[1]
    ints = (*q_strides, *k_strides, *value[1], *mask_strides,
            num_heads, num_kv_heads, q_len, kv_len, cut.num_splits, cut.m_tiles, cut.num_pairs)
    meta = cut.meta | dict(WRITE_PARTIAL=split_kv,
                           **launch_options(device_target.backend, cut.cfg.num_warps, cut.cfg.num_stages))
    split = None
    if split_kv:
        parts = cut.num_pairs * cut.rows_per_pair
        merge_ints = (num_heads, num_kv_heads, q_len, cut.num_splits, cut.merge_tiles, cut.num_pairs)
        merge_meta = dict(VALUE_DIM=value_dim, BLOCK_M=MERGE_BLOCK_M, BLOCK_DV=head_block(value_dim),
                          **launch_options(device_target.backend, 4))
        split = ((cut.num_splits, parts), (cut.num_splits, parts, value_dim),
                 (device_target.programs(cut.merge_tiles * cut.num_pairs, device_target.vector_cores),), merge_ints,
                 merge_meta)
    grid = (device_target.programs(cut.m_tiles * cut.num_pairs, device_target.cube_cores),
            cut.num_splits if split_kv else 1)
    return AttentionPlan(device, dtype, (batch, q_len, num_heads, value_dim), mask_kind, grid, ints, meta, split)


def plan_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                   is_causal: bool, split_kv: bool | None = None,
                   config: AttentionConfig | None = None) -> AttentionPlan:
    """The launch for operands of these shapes and strides (``attention``'s arguments; only metadata is read).
    ``split_kv`` picks the schedule (same bits either way); None: split when the (sequence, kv head, query
    tile) programs alone would leave the device under-filled. ``config``: as ``schedule``'s."""
    return _plan((query.shape, query.stride()), (key.shape, key.stride()), (value.shape, value.stride()),
                 None if mask is None else (mask.dtype, mask.stride()), is_causal, split_kv, query.dtype, query.device,
                 config)


def launch_attention(plan: AttentionPlan, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Run ``plan`` on operands with its layout (or tensors whose data starts where theirs does: a key/value
    before its broadcast to the query's batch, say) -> a fresh [B, H, L, Dv] laid out [B, L, H, Dv]."""
    out = torch.empty(plan.out_shape, dtype=plan.dtype, device=plan.device).transpose(1, 2)
    if out.numel() == 0:
        return out
    if mask is None:
        mask = query
    elif plan.mask_kind == MASK_BOOL:
        mask = mask.view(torch.uint8)
    m_part = l_part = acc_part = out  # unused unless the keys are split
    if plan.split is not None:
        ml_shape, acc_shape, merge_grid, merge_ints, merge_meta = plan.split
        m_part = torch.empty(ml_shape, dtype=torch.float32, device=plan.device)
        l_part = torch.empty_like(m_part)
        acc_part = torch.empty(acc_shape, dtype=torch.float32, device=plan.device)
    # The launch key (kernels/launch.py): the plan fixes every constexpr and int; out and the partials are fresh.
    launch_key = (plan, aligned16(query), aligned16(key), aligned16(value), aligned16(mask))
    _attention_launch(plan.device, launch_key, plan.grid, query, key, value, mask, out, m_part, l_part, acc_part,
                      *plan.ints, scale, **plan.meta)
    if plan.split is not None:
        _merge_launch(plan.device, plan, merge_grid, m_part, l_part, acc_part, out, *merge_ints, **merge_meta)
    return out


def attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
    is_causal: bool, scale: float, split_kv: bool | None = None, config: AttentionConfig | None = None,
) -> torch.Tensor:
    """query [B, H, L, D], key [B, Hkv, S, D], value [B, Hkv, S, Dv] (any batch/head/row strides, Hkv | H),
    mask None or bool/float [B, H, L, S] (any strides, 0 for broadcast dims) -> a fresh [B, H, L, Dv] laid out
    [B, L, H, Dv] in memory (the op's output layout, bi_compile/ops/attention.py). ``split_kv`` and ``config``: as
    ``plan_attention``'s."""
    return launch_attention(plan_attention(query, key, value, mask, is_causal, split_kv, config), query, key, value,
                            mask, scale)


def emit_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                   is_causal: bool, scale: float) -> torch.Tensor:
    """``attention`` as launches that Inductor emits itself (``launch.emit_launch``), for a graph being traced with
    the operands on a CUDA device from the start of their storage and the head counts and dims static; batch and
    lengths may be symbolic. The kernels, blocks, ints and schedule are ``plan_attention``'s for the same operands
    (``schedule``), so are the bits. Where the sizes are symbolic, a ``cond`` takes the split-key branch when the
    graph runs, as the plan would. Each launch works its sizes out from its own operands, as the matmul's do: a
    ``cond`` branch traced over sizes it closes over gets them rebuilt from their expressions, and torch 2.13 drops
    a factor of such a product (batch x query tiles: a grid of -2 x batch programs)."""
    mask_kind = MASK_NONE if mask is None else MASK_BOOL if mask.dtype == torch.bool else MASK_ADDITIVE
    device_target = target(query.device)

    def cut_of(query, key, value) -> Schedule:
        (batch, num_heads, q_len, head_dim), (num_kv_heads, kv_len) = query.shape, key.shape[1:3]
        return schedule(batch, num_heads, num_kv_heads, q_len, kv_len, head_dim, value.shape[3], mask_kind,
                        is_causal, query.dtype, device_target)

    def arguments(query, key, value, mask) -> tuple[Schedule, dict, int]:
        """The schedule, the kernel's int arguments and its grid. Strides as plan_attention reads them: key/value
        broadcast to the query's batch, the mask to [B, H, L, S] (0 where broadcast)."""
        (batch, num_heads, q_len, _), kv_len = query.shape, key.shape[2]
        cut = cut_of(query, key, value)
        strides = dict(zip(
            ("stride_qb", "stride_qh", "stride_ql", "stride_qd", "stride_kb", "stride_kh", "stride_ks", "stride_kd",
             "stride_vb", "stride_vh", "stride_vs", "stride_vd", "stride_mb", "stride_mh", "stride_ml", "stride_ms"),
            (*query.stride(), *key.expand(batch, -1, -1, -1).stride(), *value.expand(batch, -1, -1, -1).stride(),
             *((0, 0, 0, 0) if mask_kind == MASK_NONE else mask.expand(batch, num_heads, q_len, kv_len).stride()))))
        ints = dict(num_heads=num_heads, num_kv_heads=key.shape[1], q_len=q_len, kv_len=kv_len,
                    num_splits=cut.num_splits, m_tiles=cut.m_tiles, num_pairs=cut.num_pairs)
        return cut, strides | ints, device_target.programs(cut.m_tiles * cut.num_pairs, device_target.cube_cores)

    def new_output(query, value):
        batch, num_heads, q_len, _ = query.shape
        return torch.empty((batch, q_len, num_heads, value.shape[3]), dtype=query.dtype, device=query.device)

    def attend(in_place: bool):
        """One program per query tile, every split merged in it (``split_kv=False``)."""
        def launch(query, key, value, mask):
            cut, ints, grid = arguments(query, key, value, mask)
            # The unused workspace pointers take the query's (never read or written).
            return emit_launch(
                _attention_kernel, (grid, 1), {"out_ptr": new_output(query, value)}, cut.cfg.num_warps,
                cut.cfg.num_stages, in_place=in_place, q_ptr=query, k_ptr=key, v_ptr=value, mask_ptr=mask,
                m_part_ptr=query, l_part_ptr=query, acc_part_ptr=query, **ints, scale=scale, WRITE_PARTIAL=False,
                **cut.meta)["out_ptr"],
        return launch

    def attend_splits(in_place: bool):
        """A program per (query tile, split) writing its state, then the merge in split order (``split_kv=True``)."""
        def launch(query, key, value, mask):
            cut, ints, grid = arguments(query, key, value, mask)
            value_dim = value.shape[3]
            parts = cut.num_pairs * cut.rows_per_pair
            states = {name: torch.empty((cut.num_splits, parts, *dims), dtype=torch.float32, device=query.device)
                      for name, dims in (("m_part_ptr", ()), ("l_part_ptr", ()), ("acc_part_ptr", (value_dim,)))}
            states = emit_launch(
                _attention_kernel, (grid, cut.num_splits), states, cut.cfg.num_warps, cut.cfg.num_stages,
                in_place=in_place, q_ptr=query, k_ptr=key, v_ptr=value, mask_ptr=mask, out_ptr=query, **ints,
                scale=scale, WRITE_PARTIAL=True, **cut.meta)
            merge_ints = {name: ints[name]
                          for name in ("num_heads", "num_kv_heads", "q_len", "num_splits", "num_pairs")}
            merge_grid = device_target.programs(cut.merge_tiles * cut.num_pairs, device_target.vector_cores)
            return emit_launch(
                _merge_splits_kernel, (merge_grid,), {"out_ptr": new_output(query, value)}, 4, in_place=in_place,
                **states, **merge_ints, m_tiles=cut.merge_tiles, VALUE_DIM=value_dim, BLOCK_M=MERGE_BLOCK_M,
                BLOCK_DV=head_block(value_dim))["out_ptr"],
        return launch

    # Without a mask the kernel's unused pointer takes the query's. A bool mask goes as it is (Triton loads a bool
    # pointer as bytes): torch 2.11's Inductor cannot lower the op path's view as uint8.
    operands = (query, key, value, query if mask is None else mask)
    splits_pay = cut_of(query, key, value).splits_pay
    if isinstance(splits_pay, bool):
        out, = (attend_splits if splits_pay else attend)(in_place=False)(*operands)
    else:
        out, = launch_cond(splits_pay, attend_splits(in_place=True), attend(in_place=True), operands)
    return out.transpose(1, 2)


_attention_launch = KeyedKernel(_attention_kernel)
_merge_launch = KeyedKernel(_merge_splits_kernel)
