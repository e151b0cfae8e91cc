"""Batch-invariant causal attention over vLLM's paged KV cache (Triton), the GPU kernel behind
``bi::paged_attention``. The caches are read through the block table where they lie: nothing is gathered.

For the new token t of request r at position p (its request's keys 0..p visible, key j in slot ``j % block_size``
of block ``block_table[r, j // block_size]``):

    out[t, h] = sum_{j <= p} softmax_j(scale * q[t, h] . k[j, h // G]) v[j, h // G]

**Tiles.** A program owns one kv head and one *tile*: ``POSITIONS`` consecutive positions of one request,
anchored at position 0 of that request (tile i holds positions [i * POSITIONS, (i + 1) * POSITIONS)), with the
G query heads of the kv head as rows: row ``(p % POSITIONS) * GROUP_BLOCK + g`` is position p, head
``kv_head * G + g`` (GROUP_BLOCK = G rounded up to a power of two, POSITIONS = BLOCK_M / GROUP_BLOCK, so the tile
is BLOCK_M rows, the height ``PAGED_ATTENTION_CONFIGS`` gives). A row's tile and its slot in it follow from its
position alone: a decode, a chunk of a prompt or the whole prompt put position p in the same slot of the same-height
tile, and the rows of a tile are independent in ``tl.dot``. Rows that are not new this step (earlier positions of
the tile, positions past the sequence, heads past G) are masked: zero queries, every key invisible, nothing stored.

**Reduction order**: bi::attention's (kernels/attention.py), its softmax step and merge in log2 units, with the
splits and chunks of its config table but a table of its own (64-row tiles on CUDA): keys are cut from key 0 into
splits of ``SPLIT_N`` (512) keys and each split into chunks of ``BLOCK_N`` keys; an online softmax takes a split's
chunks in order (``l`` as a ``tl.dot`` with ones), every chunk masked, and the split states are merged in split
order from the empty state with pinned ``tl.fma``. A tile reduces keys [0, min(seq_len, end of tile)): keys past a
row's position are masked, and a masked chunk or an all-masked split leaves a row's state bit-identical (a masked
key weighs 0, exp2(0) = 1), so neither the tile's extent nor the request's length changes a row. Keys past
``seq_len`` (a recycled block may hold anything, NaN included) are never loaded.

**The grid** follows from host values only, so a CUDA graph can capture it: T (query rows), R (block table rows),
the head counts and the two bounds the caller passes.

- ``max_tiles(T, R, max_query_len, POSITIONS)`` tile slots, an upper bound of the tiles that hold new tokens;
  each program works out which (request, first position) its slot holds (or none) from ``seq_lens`` and
  ``query_start_loc`` (``_find_tile``: an integer scan, so a step pays no extra launch per layer), and the programs
  that write the output also zero the rows of padding tokens (past ``query_start_loc[R]``);
- ``cdiv(max_seq_len, SPLIT_N)`` splits.

Two schedules give the same bits (the same ``_attend_split`` / ``_merge`` code on the same operands, fma-pinned
merges, as in bi::attention): one program per (slot, kv head) reduces its splits in order and merges as it goes
(``split_kv=False``); or, when those programs are too few to fill the device (small-batch decode), one program per
(slot, kv head, split) writes its split's fp32 state to a workspace indexed by (split, token, head) and
``_merge_splits_kernel`` folds the states in split order. Slots without a tile and splits past a tile's keys do
nothing. The merge folds exactly ``min(cdiv(key_end, SPLIT_N), splits)`` states in both schedules, where
``key_end`` is the tile's: never a count that follows the grid.

The bounds must hold (``max_seq_len >= seq_lens``, ``max_query_len >= every q_len``); a larger bound changes the
grid and the workspace, never a bit. A violated bound drops keys past ``cdiv(max_seq_len, SPLIT_N)`` splits or
tiles past the slots; it is never read out of bounds.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from .attention import (ATTENTION_CONFIGS, LOG2E, MAX_WORKSPACE_BYTES, ROW_SUM_N, _merge,
                        _merge_stored_split, _softmax_step, _store_split_state, attention_config, head_block)
from .device import Backend, launch_options, target
from .launch import KeyedKernel, aligned16, cdiv, next_power_of_2

# Requests per step of a program's tile search; padding tokens and output elements per zeroing step.
SCAN_REQUESTS = 128
ZERO_TOKENS = 16
ZERO_ELEMENTS = 256

# A (shape, strides) pair, the metadata a plan reads of an operand.
Operand = tuple[tuple[int, ...], tuple[int, ...]]

# bi::attention's table but 64-row tiles on CUDA (keyed likewise by padded head dim and fp32?): a paged step is
# mostly decodes, whose tiles hold one position each, so bi::attention's 128-row prefill tiles would only add
# masked rows. The splits and chunks are bi::attention's.
PAGED_ATTENTION_CONFIGS = {
    Backend.CUDA: {key: replace(cfg, block_m=64) for key, cfg in ATTENTION_CONFIGS[Backend.CUDA].items()},
    Backend.ASCEND: ATTENTION_CONFIGS[Backend.ASCEND],
}


def max_tiles(tokens: int, requests: int, max_query_len: int, positions: int) -> int:
    """An upper bound of the tiles holding new tokens, from host values only. A request of q_len tokens
    (q_len >= 1, any context) spans at most (q_len + P - 2) // P + 1 tiles of P positions; summed over the R
    requests of T tokens that is at most (T + R (P - 2)) // P + R, and at most R times the bound for
    ``max_query_len``."""
    if max_query_len <= 0 or tokens == 0 or requests == 0:
        return 0
    per_request = (max_query_len + positions - 2) // positions + 1
    by_tokens = (tokens + requests * (positions - 2)) // positions + requests
    return max(0, min(requests * per_request, by_tokens))


@triton.jit
def _find_tile(slot, seq_lens_ptr, starts_ptr, num_requests, POSITIONS: tl.constexpr, BLOCK_REQUESTS: tl.constexpr):
    """The tile in ``slot`` -> (its request, -1 for none; its first position). Request r's tiles take the slots
    after the tiles of requests 0..r-1: an exact integer scan over the requests, BLOCK_REQUESTS at a time, that
    every program of a launch runs for its own slot (cheaper than a kernel of its own per layer)."""
    request = tl.full([], -1, tl.int32)
    first = tl.full([], 0, tl.int32)
    done = tl.full([], 0, tl.int32)  # tiles of the requests scanned so far
    for base in range(0, num_requests, BLOCK_REQUESTS):
        r = base + tl.arange(0, BLOCK_REQUESTS)
        valid = r < num_requests
        start = tl.load(starts_ptr + r, mask=valid, other=0).to(tl.int32)
        end = tl.load(starts_ptr + r + 1, mask=valid, other=0).to(tl.int32)
        seq_len = tl.load(seq_lens_ptr + r, mask=valid, other=0).to(tl.int32)
        first_tile = (seq_len - (end - start)) // POSITIONS
        count = tl.where(valid & (end > start), (seq_len - 1) // POSITIONS - first_tile + 1, 0)
        ends = done + tl.cumsum(count, 0)
        begins = ends - count
        owns = (slot >= begins) & (slot < ends)  # one request at most
        request += tl.sum(tl.where(owns, r + 1, 0), 0)
        first += tl.sum(tl.where(owns, (first_tile + slot - begins) * POSITIONS, 0), 0)
        done += tl.sum(count, 0)
    return request, first


@triton.jit
def _zero_padding(out_ptr, starts_ptr, num_requests, num_tokens, row_elements, program, programs,
                  BLOCK_TOKENS: tl.constexpr, BLOCK_ELEMENTS: tl.constexpr):
    """Zero the output rows of the padding tokens (past query_start_loc[R]; out is [T, row_elements], contiguous):
    program ``program`` of ``programs`` takes every programs-th block of BLOCK_TOKENS tokens from the first block
    that holds padding."""
    real_tokens = tl.load(starts_ptr + num_requests).to(tl.int32)
    first_block = real_tokens // BLOCK_TOKENS
    zeros = tl.zeros([BLOCK_TOKENS, BLOCK_ELEMENTS], out_ptr.dtype.element_ty)
    elements = tl.arange(0, BLOCK_ELEMENTS)
    for block in range(first_block + (program - first_block % programs + programs) % programs,
                       tl.cdiv(num_tokens, BLOCK_TOKENS), programs):
        tokens = block * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
        padding = (tokens >= real_tokens) & (tokens < num_tokens)
        rows = tokens.to(tl.int64) * row_elements
        for e in range(0, row_elements, BLOCK_ELEMENTS):
            tl.store(out_ptr + rows[:, None] + (e + elements)[None, :], zeros,
                     mask=padding[:, None] & ((e + elements)[None, :] < row_elements))


@triton.jit
def _tile_rows(slot, kv_head, seq_lens_ptr, starts_ptr, num_requests, GROUP: tl.constexpr,
               GROUP_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_N: tl.constexpr, POSITIONS: tl.constexpr,
               BLOCK_REQUESTS: tl.constexpr):
    """The tile in ``slot`` -> its request (0 for an empty slot) and the request's length, the rows' positions,
    heads and tokens, which rows are new (row_valid), the keys the tile reduces (key_end; 0 for an empty slot) and
    its split count."""
    request, first = _find_tile(slot, seq_lens_ptr, starts_ptr, num_requests, POSITIONS, BLOCK_REQUESTS)
    real = request >= 0
    request = tl.maximum(request, 0)
    seq_len = tl.load(seq_lens_ptr + request).to(tl.int32)
    start = tl.load(starts_ptr + request).to(tl.int32)
    context = seq_len - (tl.load(starts_ptr + request + 1).to(tl.int32) - start)
    rows = tl.arange(0, BLOCK_M)
    g = rows % GROUP_BLOCK
    pos = first + rows // GROUP_BLOCK
    head = kv_head * GROUP + g
    row_valid = real & (g < GROUP) & (pos >= context) & (pos < seq_len)
    token = (start + pos - context).to(tl.int64)
    key_end = tl.where(real, tl.minimum(seq_len, first + BLOCK_M // GROUP_BLOCK), 0)
    return request, seq_len, pos, head, token, row_valid, key_end, (key_end + SPLIT_N - 1) // SPLIT_N


@triton.jit
def _attend_split(
    q, split, k_base, v_base, table_row, pos, row_valid, seq_len, key_end,
    stride_kb, stride_ks, stride_vb, stride_vs, qk_scale,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax over the keys of one split of the paged cache, chunk by chunk -> (m, l, acc) of the split
    alone (m in log2 units): bi::attention's ``_softmax_step`` on keys whose addresses are read through the block
    table, every chunk masked."""
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M, ROW_SUM_N], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    ones = tl.full([BLOCK_N, ROW_SUM_N], 1.0, v_base.dtype.element_ty)
    start = split * SPLIT_N
    for first in range(start, tl.minimum(start + SPLIT_N, key_end), BLOCK_N):
        keys = first + tl.arange(0, BLOCK_N)
        key_valid = keys < seq_len  # slots past the request's length are never read
        block = tl.load(table_row + keys // BLOCK_SIZE, mask=key_valid, other=0).to(tl.int64)
        slot = keys % BLOCK_SIZE
        k_t = tl.load(
            k_base + block[None, :] * stride_kb + slot[None, :] * stride_ks + d[:, None],
            mask=key_valid[None, :] & (d[:, None] < HEAD_DIM), other=0.0,
        )
        v = tl.load(
            v_base + block[:, None] * stride_vb + slot[:, None] * stride_vs + dv[None, :],
            mask=key_valid[:, None] & (dv[None, :] < VALUE_DIM), other=0.0,
        )
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION)
        visible = key_valid[None, :] & row_valid[:, None] & (keys[None, :] <= pos[:, None])
        m, l, acc = _softmax_step(s, visible, 0.0, v, m, l, acc, ones, qk_scale, True, False, DOT_PRECISION)
    return m, tl.max(l, 1), acc  # the columns of l are equal: max picks that value exactly


@triton.jit
def _finish(out_ptr, l, acc, token, head, row_valid, NUM_HEADS: tl.constexpr, VALUE_DIM: tl.constexpr,
            BLOCK_DV: tl.constexpr):
    """out[token, head] = acc / l (out is fresh [T, H, Dv]); every new row saw key 0, so l > 0."""
    dv = tl.arange(0, BLOCK_DV)
    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
    tl.store(out_ptr + ((token * NUM_HEADS + head) * VALUE_DIM)[:, None] + dv[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & (dv[None, :] < VALUE_DIM))


@triton.jit(do_not_specialize=["num_requests", "num_tokens", "num_splits"])
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, seq_lens_ptr, starts_ptr, out_ptr, m_part_ptr, l_part_ptr, acc_part_ptr,
    stride_qt, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_table,
    num_requests, num_tokens, num_splits, scale,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, WRITE_PARTIAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr, POSITIONS: tl.constexpr, BLOCK_REQUESTS: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr, BLOCK_ELEMENTS: tl.constexpr,
):
    """Grid (slots x Hkv, 1 or splits). WRITE_PARTIAL: split program_id(1)'s state goes to the workspace
    [splits, T, H] (+ [.., Dv] for acc); else every split of the tile, merged in order, the output, and the
    padding rows' zeros."""
    qk_scale = tl.cast(scale, tl.float32) * LOG2E
    slot = tl.program_id(0) // NUM_KV_HEADS
    kv_head = tl.program_id(0) % NUM_KV_HEADS
    request, seq_len, pos, head, token, row_valid, key_end, tile_splits = _tile_rows(
        slot, kv_head, seq_lens_ptr, starts_ptr, num_requests, GROUP, GROUP_BLOCK, BLOCK_M, SPLIT_N, POSITIONS,
        BLOCK_REQUESTS)
    tile_splits = tl.minimum(tile_splits, num_splits)
    d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_valid[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh
    table_row = table_ptr + request.to(tl.int64) * stride_table
    if WRITE_PARTIAL:
        split = tl.program_id(1)
        m, l, acc = _attend_split(
            q, split, k_base, v_base, table_row, pos, row_valid, seq_len, key_end,
            stride_kb, stride_ks, stride_vb, stride_vs, qk_scale,
            HEAD_DIM, VALUE_DIM, BLOCK_SIZE, BLOCK_M, BLOCK_N, SPLIT_N, BLOCK_D, BLOCK_DV, DOT_PRECISION,
        )
        part = (split * num_tokens + token) * NUM_HEADS + head
        _store_split_state(m_part_ptr, l_part_ptr, acc_part_ptr, part, m, l, acc, row_valid & (split < tile_splits),
                           VALUE_DIM, BLOCK_DV)
    else:
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        for split in range(0, tile_splits):
            m_split, l_split, acc_split = _attend_split(
                q, split, k_base, v_base, table_row, pos, row_valid, seq_len, key_end,
                stride_kb, stride_ks, stride_vb, stride_vs, qk_scale,
                HEAD_DIM, VALUE_DIM, BLOCK_SIZE, BLOCK_M, BLOCK_N, SPLIT_N, BLOCK_D, BLOCK_DV, DOT_PRECISION,
            )
            m, l, acc = _merge(m, l, acc, m_split, l_split, acc_split, BLOCK_M, BLOCK_DV)
        _finish(out_ptr, l, acc, token, head, row_valid, NUM_HEADS, VALUE_DIM, BLOCK_DV)
        _zero_padding(out_ptr, starts_ptr, num_requests, num_tokens, NUM_HEADS * VALUE_DIM, tl.program_id(0),
                      tl.num_programs(0), BLOCK_TOKENS, BLOCK_ELEMENTS)


@triton.jit(do_not_specialize=["num_requests", "num_tokens", "num_splits"])
def _merge_splits_kernel(
    seq_lens_ptr, starts_ptr, m_part_ptr, l_part_ptr, acc_part_ptr, out_ptr, num_requests, num_tokens, num_splits,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_BLOCK: tl.constexpr,
    VALUE_DIM: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_N: tl.constexpr, BLOCK_DV: tl.constexpr,
    POSITIONS: tl.constexpr, BLOCK_REQUESTS: tl.constexpr, BLOCK_TOKENS: tl.constexpr, BLOCK_ELEMENTS: tl.constexpr,
):
    """Grid (slots x Hkv): fold the split states ``_paged_attention_kernel`` wrote for the tile's rows, in split
    order, write the output and the padding rows' zeros."""
    slot = tl.program_id(0) // NUM_KV_HEADS
    kv_head = tl.program_id(0) % NUM_KV_HEADS
    request, seq_len, pos, head, token, row_valid, key_end, tile_splits = _tile_rows(
        slot, kv_head, seq_lens_ptr, starts_ptr, num_requests, GROUP, GROUP_BLOCK, BLOCK_M, SPLIT_N, POSITIONS,
        BLOCK_REQUESTS)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for split in range(0, tl.minimum(tile_splits, num_splits)):
        part = (split * num_tokens + token) * NUM_HEADS + head
        m, l, acc = _merge_stored_split(m, l, acc, m_part_ptr, l_part_ptr, acc_part_ptr, part, row_valid,
                                        BLOCK_M, VALUE_DIM, BLOCK_DV)
    _finish(out_ptr, l, acc, token, head, row_valid, NUM_HEADS, VALUE_DIM, BLOCK_DV)
    _zero_padding(out_ptr, starts_ptr, num_requests, num_tokens, NUM_HEADS * VALUE_DIM, tl.program_id(0),
                  tl.num_programs(0), BLOCK_TOKENS, BLOCK_ELEMENTS)


@dataclass(frozen=True, eq=False)
class PagedAttentionPlan:
    """What every launch for operands of one layout shares (``plan_paged_attention``); the grid follows per call
    from T and the bounds. Hashed by identity: a plan is the first part of its launches' keys."""

    device: torch.device
    dtype: torch.dtype
    tokens: int
    requests: int
    heads: int
    kv_heads: int
    value_dim: int
    positions: int  # query positions per tile
    split_n: int
    cores: int  # programs that fill the device (split-KV below twice this)
    strides: tuple[int, ...]
    meta: dict
    merge_meta: dict


@functools.lru_cache(maxsize=4096)
def _plan(query: Operand, key_cache: Operand, value_cache: Operand, table_stride: int, requests: int,
          dtype: torch.dtype, device: torch.device) -> PagedAttentionPlan:
    (tokens, heads, head_dim), (stride_qt, stride_qh, _) = query
    (_, kv_heads, block_size, _), (stride_kb, stride_kh, stride_ks, _) = key_cache
    (*_, value_dim), (stride_vb, stride_vh, stride_vs, _) = value_cache
    device_target = target(device)
    cfg = attention_config(head_dim, value_dim, dtype, device_target.backend, PAGED_ATTENTION_CONFIGS)
    group = heads // kv_heads
    group_block = next_power_of_2(group)
    block_m = max(cfg.block_m, group_block)
    shared = dict(NUM_HEADS=heads, NUM_KV_HEADS=kv_heads, GROUP=group, GROUP_BLOCK=group_block,
                  VALUE_DIM=value_dim, BLOCK_M=block_m, SPLIT_N=cfg.split_n, BLOCK_DV=head_block(value_dim),
                  POSITIONS=block_m // group_block, BLOCK_REQUESTS=SCAN_REQUESTS, BLOCK_TOKENS=ZERO_TOKENS,
                  BLOCK_ELEMENTS=ZERO_ELEMENTS)
    meta = dict(shared, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_N=cfg.block_n, BLOCK_D=head_block(head_dim),
                DOT_PRECISION=device_target.dot_precision(dtype),
                **launch_options(device_target.backend, cfg.num_warps, cfg.num_stages))
    merge_meta = dict(shared, **launch_options(device_target.backend, 4))
    return PagedAttentionPlan(
        device, dtype, tokens, requests, heads, kv_heads, value_dim, block_m // group_block, cfg.split_n,
        device_target.cube_cores,
        (stride_qt, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, table_stride),
        meta, merge_meta)


def plan_paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                         block_table: torch.Tensor) -> PagedAttentionPlan:
    """The launch's layout for operands of these shapes and strides (only metadata is read)."""
    return _plan((query.shape, query.stride()), (key_cache.shape, key_cache.stride()),
                 (value_cache.shape, value_cache.stride()), block_table.stride(0), block_table.shape[0],
                 query.dtype, query.device)


def launch_paged_attention(plan: PagedAttentionPlan, query: torch.Tensor, key_cache: torch.Tensor,
                           value_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                           query_start_loc: torch.Tensor, scale: float, max_query_len: int, max_seq_len: int,
                           split_kv: bool | None = None) -> torch.Tensor:
    """Run ``plan`` on operands with its layout -> a fresh [T, H, Dv]. Reads nothing from the device: the grid,
    the workspace and every launch argument follow from the plan, ``max_query_len`` and ``max_seq_len``.
    ``split_kv`` picks the schedule (same bits either way); None: split when the (slot, kv head) programs alone
    would leave the device under-filled and the workspace is at most ``MAX_WORKSPACE_BYTES``."""
    tokens, heads, value_dim = plan.tokens, plan.heads, plan.value_dim
    out = torch.empty((tokens, heads, value_dim), dtype=plan.dtype, device=plan.device)
    slots = max_tiles(tokens, plan.requests, max_query_len, plan.positions)
    splits = cdiv(max(max_seq_len, 0), plan.split_n)
    if slots == 0 or splits == 0:
        return out.zero_()
    aligned = (aligned16(query), aligned16(key_cache), aligned16(value_cache), aligned16(block_table),
               aligned16(seq_lens), aligned16(query_start_loc), seq_lens.dtype, query_start_loc.dtype,
               block_table.dtype)
    programs = slots * plan.kv_heads
    workspace_bytes = splits * tokens * heads * (value_dim + 2) * 4
    if split_kv is None:
        split_kv = splits > 1 and programs < 2 * plan.cores and workspace_bytes <= MAX_WORKSPACE_BYTES
    m_part = l_part = acc_part = out  # unused unless the keys are split
    if split_kv:
        m_part = torch.empty((splits, tokens, heads), dtype=torch.float32, device=plan.device)
        l_part = torch.empty_like(m_part)
        acc_part = torch.empty((splits, tokens, heads, value_dim), dtype=torch.float32, device=plan.device)
    _paged_attention_launch(plan.device, (plan, aligned, split_kv), (programs, splits if split_kv else 1),
                            query, key_cache, value_cache, block_table, seq_lens, query_start_loc, out, m_part, l_part,
                            acc_part, *plan.strides, plan.requests, tokens, splits, scale, WRITE_PARTIAL=split_kv,
                            **plan.meta)
    if split_kv:
        _merge_launch(plan.device, (plan, aligned), (programs,), seq_lens, query_start_loc, m_part, l_part, acc_part,
                      out, plan.requests, tokens, splits, **plan.merge_meta)
    return out


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_table: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                    max_query_len: int, max_seq_len: int, split_kv: bool | None = None) -> torch.Tensor:
    """query [T, H, D], key_cache [blocks, Hkv, block_size, D], value_cache [blocks, Hkv, block_size, Dv] (unit
    last strides), block_table [R, max_blocks], seq_lens [R], query_start_loc [R + 1] (int32/int64) -> a fresh
    [T, H, Dv]: bi::paged_attention's semantics (bi_compile/ops/paged_attention.py), inputs unchecked."""
    plan = plan_paged_attention(query, key_cache, value_cache, block_table)
    return launch_paged_attention(plan, query, key_cache, value_cache, block_table, seq_lens, query_start_loc, scale,
                                  max_query_len, max_seq_len, split_kv)


_paged_attention_launch = KeyedKernel(_paged_attention_kernel)
_merge_launch = KeyedKernel(_merge_splits_kernel)
