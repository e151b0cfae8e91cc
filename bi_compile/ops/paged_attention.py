"""``bi::paged_attention``: causal attention of packed variable-length queries over a paged KV cache, with a
reduction order fixed by each query's own position (the attention of bi-compile's vLLM backend).

    out[t, h] = sum_{j <= p(t)} softmax_j(scale * q[t, h] . k[r, h // G, j]) v[r, h // G, j]

for token t of request r at position p(t). Inputs, as vLLM's paged-attention metadata gives them:

- query [T, H, D]: the requests' new tokens back to back; request r owns tokens
  ``query_start_loc[r] : query_start_loc[r + 1]``, the last ``q_len`` of its ``seq_lens[r]`` positions (a decode is
  q_len 1, a chunk of a prefill any q_len; the earlier positions are already in the cache). Tokens past
  ``query_start_loc[-1]`` (padding) get 0.
- key_cache [num_blocks, Hkv, block_size, D], value_cache [num_blocks, Hkv, block_size, Dv], any strides: key j of
  request r is slot ``j % block_size`` of block ``block_table[r, j // block_size]``. The new tokens' keys must be
  in the cache already.
- ``max_query_len``, ``max_seq_len``: upper bounds of the query lengths and of ``seq_lens``, host ints given by
  the caller (vLLM keeps them on the host), so the GPU path sizes its grid and workspace without reading the
  device. Under CUDA-graph capture pass static bounds that hold for every replay (``max_model_len`` for
  ``max_seq_len``; 1 for ``max_query_len`` in a uniform decode step, else the step's token budget): a larger bound
  never changes a bit. A bound that does not hold drops keys or tokens (never reads out of bounds).

Supported: fp16, bf16, fp32 (q and both caches one dtype), D and Dv up to 256, Hkv dividing H, int32/int64 metadata.

**Invariance.** A query row's bits depend only on its q, its position and its request's keys up to that position:
not on the other requests, its place in the batch, or how its request's prompt was cut into chunks.

- CPU (:func:`_paged_attention_cpu`, pure PyTorch, by construction): the rows of a (request, kv head) are packed as
  ``(position, head in group)`` into tiles of ``CPU_TILE_POSITIONS`` positions anchored at position 0, so a row's
  tile and its slot in it follow from its position alone (a chunk boundary or a decode never moves it). A tile at
  positions [a, a + P) reduces keys [0, a + P) in chunks of ``CPU_KEY_CHUNK`` keys anchored at key 0, one
  online-softmax step per chunk, in key order: the number of steps is a function of the tile. Each step runs for
  exactly ``CPU_TILES_PER_CALL`` tiles (padding tiles are computed and dropped), so every torch call (bmm, amax, sum,
  exp) has one shape per (D, Dv, G), whatever the batch; rows and tiles are independent in every one of them.
  Keys a row may not see are set to -inf with ``torch.where`` and add exact zeros (exp(-inf) = 0), and cache slots
  past a request's length are zeroed before use (a recycled block may hold anything, NaN included).
- CUDA (``bi_compile.kernels.paged_attention``, Triton): the caches are read where they lie, through the block
  table. A program owns one kv head and a tile of 64 rows: the G heads of the kv head (G rounded up to a power of
  two) at ``64 / G`` consecutive positions of one request, tiles anchored at the request's position 0 (the same
  tile and slot for a row whatever the chunking; one position per tile from G = 64 on). Keys are reduced as in ``bi::attention``: fixed 512-key splits anchored at key 0, chunks in order
  inside a split, split states merged in order with pinned fma; masked keys are exact no-ops and slots past a
  request's length are never read. The grid depends only on T, R, the head counts and the two bounds (tile slots
  for ``max_query_len``, splits for ``max_seq_len``); each program finds its slot's (request, first position) on
  the device from ``seq_lens`` and ``query_start_loc``, and the programs that write the output zero the padding
  rows, so the op makes no device-to-host read and a CUDA graph can capture it. A small batch of decodes takes one
  program per split and a merge kernel, a large one merges in the split programs: the same bits.
- Ascend (PrivateUse1): the requests are gathered into a padded [R, H, max_query_len, D] query and [R, Hkv,
  max_seq_len, D] keys and values with a bool mask, and ``bi::attention`` does the rest (the same 512-key splits),
  so neither the padding nor the batch changes a row's bits; its buffers follow the bounds too.
"""

from __future__ import annotations

import math

import torch

from bi_compile.ops import attention as _attention  # noqa: F401  (defines torch.ops.bi.attention, used on Ascend)
from bi_compile.ops import library
from bi_compile.ops.library import Layout

OP = "bi::paged_attention"
MAX_HEAD_DIM = 256
INDEX_DTYPES = (torch.int32, torch.int64)

library.layout_contract(OP, query=Layout.UNIT_STRIDE_ROWS, key_cache=Layout.UNIT_STRIDE_ROWS,
                        value_cache=Layout.UNIT_STRIDE_ROWS, block_table=Layout.UNIT_STRIDE_ROWS)

# CPU tiling: query positions per tile (times G rows), keys per online-softmax step, tiles per torch call.
CPU_TILE_POSITIONS = 8
CPU_KEY_CHUNK = 64
CPU_TILES_PER_CALL = 16


@library.memoized_on_metadata
def _check(query, key_cache, value_cache, block_table, seq_lens, query_start_loc) -> None:
    tensors = dict(query=query, key_cache=key_cache, value_cache=value_cache, block_table=block_table,
                   seq_lens=seq_lens, query_start_loc=query_start_loc)
    library.check_dtype(OP, query=query, key_cache=key_cache, value_cache=value_cache)
    library.check_dtype(OP, INDEX_DTYPES, block_table=block_table, seq_lens=seq_lens, query_start_loc=query_start_loc)
    library.check_rank(OP, (3,), query=query)
    library.check_rank(OP, (4,), key_cache=key_cache, value_cache=value_cache)
    library.check_rank(OP, (2,), block_table=block_table)
    library.check_rank(OP, (1,), seq_lens=seq_lens, query_start_loc=query_start_loc)
    if key_cache.dtype != query.dtype or value_cache.dtype != query.dtype:
        raise library.reject(OP, "query and the caches must have one dtype", **tensors)
    if len({t.device for t in tensors.values()}) > 1:
        raise library.reject(OP, "all tensors must be on one device", **tensors)
    heads, head_dim = query.shape[1:]
    num_blocks, kv_heads, block_size, key_dim = key_cache.shape
    if tuple(value_cache.shape[:3]) != (num_blocks, kv_heads, block_size):
        raise library.reject(OP, "key_cache and value_cache must agree in blocks, heads and block size",
                             key_cache=key_cache, value_cache=value_cache)
    if key_dim != head_dim:
        raise library.reject(OP, "query and key_cache head dims differ", query=query, key_cache=key_cache)
    if not (0 < head_dim <= MAX_HEAD_DIM and 0 < value_cache.shape[3] <= MAX_HEAD_DIM):
        raise library.reject(OP, f"head dims must be in 1..{MAX_HEAD_DIM}", query=query, value_cache=value_cache)
    if kv_heads == 0 or heads % kv_heads != 0:
        raise library.reject(OP, "the number of kv heads must divide the number of query heads", **tensors)
    requests = block_table.shape[0]
    if seq_lens.shape[0] != requests or query_start_loc.shape[0] != requests + 1:
        raise library.reject(OP, "block_table, seq_lens and query_start_loc must describe the same requests "
                             "(R rows, R lengths, R + 1 starts)", block_table=block_table, seq_lens=seq_lens,
                             query_start_loc=query_start_loc)


# ---- CPU: batch-invariant by construction ----


def _cpu_plan(seq_lens: list[int], starts: list[int], kv_heads: int, positions: int):
    """One work item per (request, kv head, tile of ``positions`` query positions) that holds a new token:
    (request, kv head, first position of the tile, key chunks the tile reduces)."""
    items = []
    for request, seq_len in enumerate(seq_lens):
        q_len = starts[request + 1] - starts[request]
        if q_len <= 0:
            continue
        first_tile, last_tile = (seq_len - q_len) // positions, (seq_len - 1) // positions
        for tile in range(first_tile, last_tile + 1):
            chunks = -(-(tile + 1) * positions // CPU_KEY_CHUNK)  # keys [0, end of tile), a function of the tile
            items.extend((request, head, tile * positions, chunks) for head in range(kv_heads))
    return items


def _paged_attention_cpu(query, key_cache, value_cache, block_table, seq_lens, query_start_loc, scale):
    """The plan is made on the host from the metadata; the tiles then run ``_attend_step`` chunk by chunk."""
    tokens, heads, head_dim = query.shape
    kv_heads, block_size, value_dim = key_cache.shape[1], key_cache.shape[2], value_cache.shape[3]
    group, positions = heads // kv_heads, CPU_TILE_POSITIONS
    rows = positions * group
    out = query.new_zeros((tokens, heads, value_dim))
    lens, starts = seq_lens.tolist(), query_start_loc.tolist()
    items = _cpu_plan(lens, starts, kv_heads, positions)
    if not items:
        return out
    request, kv_head, first, chunks = (torch.tensor(column) for column in zip(*items))

    # Row (i, g) of an item: position first + i of head kv_head * G + g; token -1 where that position is not new.
    pos = first[:, None] + torch.arange(positions)  # [N, P]
    q_len = query_start_loc[1:].long() - query_start_loc[:-1].long()
    context = seq_lens.long() - q_len
    new = (pos >= context[request, None]) & (pos < seq_lens.long()[request, None])
    token = torch.where(new, query_start_loc.long()[request, None] + pos - context[request, None], -1)
    q = query.float().view(tokens, kv_heads, group, head_dim)[token.clamp(min=0), kv_head[:, None]]  # [N, P, G, D]
    q = torch.where(new[:, :, None, None], q, 0.0).reshape(-1, rows, head_dim)
    row_pos = pos.repeat_interleave(group, dim=1)  # [N, rows]

    m = torch.full((len(items), rows, 1), -math.inf)
    l = torch.zeros((len(items), rows, 1))
    acc = torch.zeros((len(items), rows, value_dim))
    table = block_table.long()
    chunk_keys = torch.arange(CPU_KEY_CHUNK)
    for chunk in range(int(chunks.max())):
        active = torch.nonzero(chunks > chunk).flatten()
        for part in active.split(CPU_TILES_PER_CALL):
            ids = torch.nn.functional.pad(part, (0, CPU_TILES_PER_CALL - part.shape[0]))  # pad with item 0: dropped
            keys = chunk * CPU_KEY_CHUNK + chunk_keys  # [C]
            req = request[ids]
            stored = keys[None, :] < seq_lens.long()[req, None]  # [W, C]
            block_col = (keys // block_size).clamp(max=table.shape[1] - 1)
            blocks = torch.where(stored, table[req[:, None], block_col[None, :]], 0)
            heads_ = kv_head[ids][:, None]
            k = torch.where(stored[..., None], key_cache[blocks, heads_, keys % block_size].float(), 0.0)
            v = torch.where(stored[..., None], value_cache[blocks, heads_, keys % block_size].float(), 0.0)
            visible = keys[None, None, :] <= row_pos[ids][:, :, None]  # [W, rows, C]
            state = _attend_step(q[ids], k, v, visible, m[ids], l[ids], acc[ids], scale)
            real = part.shape[0]
            for held, new_value in zip((m, l, acc), state):
                held[part] = new_value[:real]

    result = (acc / torch.where(l == 0, 1.0, l)).view(len(items), positions, group, value_dim)
    # Each new (token, head) is the row of exactly one item.
    out.view(tokens, kv_heads, group, value_dim)[token[new], kv_head[:, None].expand_as(token)[new]] = \
        result[new].to(query.dtype)
    return out


def _attend_step(q, k, v, visible, m, l, acc, scale: float):
    """One online-softmax step for W tiles, all fp32 and one shape: q [W, rows, D], k [W, C, D], v [W, C, Dv],
    visible [W, rows, C], state m, l [W, rows, 1], acc [W, rows, Dv] -> the new state."""
    s = torch.where(visible, torch.bmm(q, k.transpose(1, 2)) * scale, -math.inf)
    m_new = torch.maximum(m, s.amax(-1, keepdim=True))
    shift = torch.where(m_new == -math.inf, 0.0, m_new)  # no -inf - -inf while a row has seen no key
    alpha = torch.exp(m - shift)
    p = torch.exp(s - shift)
    return m_new, l * alpha + p.sum(-1, keepdim=True), acc * alpha + torch.bmm(p, v)


# ---- Ascend: gathered into padded dense tensors for bi::attention ----


def _paged_attention_dense(query, key_cache, value_cache, block_table, seq_lens, query_start_loc, scale,
                           max_query_len: int, max_seq_len: int, attend):
    """Gather the requests into [R, H, max_query_len, D] / [R, Hkv, max_seq_len, D*] with a bool mask
    [R, 1, max_query_len, max_seq_len], call ``attend(q, k, v, mask, scale)`` and scatter the rows back. Index
    arithmetic only, on the device: no host sync."""
    tokens, heads, head_dim = query.shape
    block_size = key_cache.shape[2]
    requests = block_table.shape[0]
    device = query.device
    starts, lens = query_start_loc.long(), seq_lens.long()
    q_len = starts[1:] - starts[:-1]
    context = lens - q_len
    i = torch.arange(max_query_len, device=device)
    new = i[None, :] < q_len[:, None]  # [R, Lq]
    token = torch.where(new, starts[:-1, None] + i, 0)
    q = torch.where(new[:, :, None, None], query[token], 0).permute(0, 2, 1, 3)  # [R, H, Lq, D] (a view)

    j = torch.arange(max_seq_len, device=device)
    stored = j[None, :] < lens[:, None]  # [R, S]
    blocks = torch.where(stored, block_table.long().gather(1, (j // block_size).clamp(max=block_table.shape[1] - 1)
                                                          .expand(requests, -1)), 0)
    k = torch.where(stored[:, :, None, None], key_cache[blocks, :, j % block_size], 0).permute(0, 2, 1, 3)
    v = torch.where(stored[:, :, None, None], value_cache[blocks, :, j % block_size], 0).permute(0, 2, 1, 3)
    mask = (new[:, :, None] & (j[None, None, :] <= (context[:, None] + i)[:, :, None]))[:, None]
    out = attend(q, k, v, mask, scale)  # [R, H, Lq, Dv]

    # Token t belongs to the request whose range holds it; tokens past the last request (padding) get 0.
    t = torch.arange(tokens, device=device)
    owner = torch.searchsorted(starts[1:], t, right=True)
    real = owner < requests
    owner = owner.clamp(max=requests - 1)
    rows = out[owner, :, (t - starts[owner]).clamp(0, max_query_len - 1)]  # [T, H, Dv]
    return torch.where(real[:, None, None], rows, 0)


def _bi_attend(q, k, v, mask, scale):
    return torch.ops.bi.attention(q, k, v, mask, scale=scale, enable_gqa=True)


# ---- the op ----


def _paged_attention_fake(query, key_cache, value_cache, block_table, seq_lens, query_start_loc, scale,
                          max_query_len, max_seq_len):
    _check(query, key_cache, value_cache, block_table, seq_lens, query_start_loc)
    return query.new_empty((*query.shape[:2], value_cache.shape[3]))


def _prepare(query, key_cache, value_cache, block_table, seq_lens, query_start_loc):
    _check(query, key_cache, value_cache, block_table, seq_lens, query_start_loc)
    library.check_layout(OP, query=query, key_cache=key_cache, value_cache=value_cache, block_table=block_table)


def _paged_attention_on_cpu(query, key_cache, value_cache, block_table, seq_lens, query_start_loc, scale,
                            max_query_len, max_seq_len):
    _prepare(query, key_cache, value_cache, block_table, seq_lens, query_start_loc)
    return _paged_attention_cpu(query, key_cache, value_cache, block_table, seq_lens, query_start_loc, scale)


@library.memoized_on_metadata
def _triton_plan(query, key_cache, value_cache, block_table, seq_lens, query_start_loc):
    """The inputs checked and the kernel's launch layout planned, once per layout; None on Ascend (the gather)."""
    from bi_compile.kernels import device
    from bi_compile.kernels import paged_attention as kernels

    _prepare(query, key_cache, value_cache, block_table, seq_lens, query_start_loc)
    if device.target(query.device).backend is device.Backend.ASCEND:
        return None
    return kernels.plan_paged_attention(query, key_cache, value_cache, block_table)


def _paged_attention_triton(query, key_cache, value_cache, block_table, seq_lens, query_start_loc, scale,
                            max_query_len, max_seq_len):
    from bi_compile.kernels import paged_attention as kernels

    plan = _triton_plan(query, key_cache, value_cache, block_table, seq_lens, query_start_loc)
    if plan is not None:
        return kernels.launch_paged_attention(plan, query, key_cache, value_cache, block_table, seq_lens,
                                              query_start_loc, scale, max_query_len, max_seq_len)
    if block_table.shape[0] == 0 or max_query_len == 0:
        return query.new_zeros((*query.shape[:2], value_cache.shape[3]))
    return _paged_attention_dense(query, key_cache, value_cache, block_table, seq_lens, query_start_loc, scale,
                                  max_query_len, max_seq_len, _bi_attend)


# Batch-invariant causal paged attention: [T, H, D] over [blocks, Hkv, block_size, D*] caches -> [T, H, Dv].
library.define_op(
    "paged_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_table, Tensor seq_lens, "
    "Tensor query_start_loc, float scale, int max_query_len, int max_seq_len) -> Tensor",
    fake=_paged_attention_fake, cpu=_paged_attention_on_cpu, triton=_paged_attention_triton,
)


# ---- the KV-cache write that comes with it ----

WRITE_OP = "bi::write_kv_cache"
library.layout_contract(WRITE_OP, key=Layout.UNIT_STRIDE_ROWS, value=Layout.UNIT_STRIDE_ROWS,
                        key_cache=Layout.UNIT_STRIDE_ROWS, value_cache=Layout.UNIT_STRIDE_ROWS)


def _check_write(key, value, key_cache, value_cache, slot_mapping) -> None:
    tensors = dict(key=key, value=value, key_cache=key_cache, value_cache=value_cache, slot_mapping=slot_mapping)
    library.check_dtype(WRITE_OP, key=key, value=value, key_cache=key_cache, value_cache=value_cache)
    library.check_dtype(WRITE_OP, INDEX_DTYPES, slot_mapping=slot_mapping)
    library.check_rank(WRITE_OP, (3,), key=key, value=value)
    library.check_rank(WRITE_OP, (4,), key_cache=key_cache, value_cache=value_cache)
    library.check_rank(WRITE_OP, (1,), slot_mapping=slot_mapping)
    if len({key.dtype, value.dtype, key_cache.dtype, value_cache.dtype}) > 1:
        raise library.reject(WRITE_OP, "keys, values and the caches must have one dtype", **tensors)
    if len({t.device for t in tensors.values()}) > 1:
        raise library.reject(WRITE_OP, "all tensors must be on one device", **tensors)
    if (key.shape[0] != value.shape[0] or key.shape[1:] != (key_cache.shape[1], key_cache.shape[3])
            or value.shape[1:] != (value_cache.shape[1], value_cache.shape[3])
            or key_cache.shape[:3] != value_cache.shape[:3]):
        raise library.reject(WRITE_OP, "key [T, Hkv, D] and value [T, Hkv, Dv] must match key_cache [blocks, Hkv, "
                             "block_size, D] and value_cache [blocks, Hkv, block_size, Dv]", **tensors)


def _write_kv_cache_fake(key, value, key_cache, value_cache, slot_mapping) -> None:
    _check_write(key, value, key_cache, value_cache, slot_mapping)


@library.memoized_on_metadata
def _prepare_write(key, value, key_cache, value_cache, slot_mapping) -> None:
    _check_write(key, value, key_cache, value_cache, slot_mapping)
    library.check_layout(WRITE_OP, key=key, value=value, key_cache=key_cache, value_cache=value_cache)


def _write_kv_cache_torch(key, value, key_cache, value_cache, slot_mapping) -> None:
    """Indexing with the real tokens' slots: a data-dependent count, so eager only (CPUs run no graphs; on Ascend,
    where this path runs too, bi-compile's vLLM backend is not used: its platform is CPU or CUDA)."""
    _prepare_write(key, value, key_cache, value_cache, slot_mapping)
    tokens = min(key.shape[0], slot_mapping.shape[0])
    slots = slot_mapping[:tokens].long()
    real = slots >= 0
    slots = slots[real]
    block_size = key_cache.shape[2]
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, :, offsets] = key[:tokens][real]
    value_cache[blocks, :, offsets] = value[:tokens][real]


def _write_kv_cache_triton(key, value, key_cache, value_cache, slot_mapping) -> None:
    from bi_compile.kernels import device
    from bi_compile.kernels.kv_cache import write_kv_cache

    if device.target(key.device).backend is device.Backend.ASCEND:
        return _write_kv_cache_torch(key, value, key_cache, value_cache, slot_mapping)
    _prepare_write(key, value, key_cache, value_cache, slot_mapping)
    write_kv_cache(key, value, key_cache, value_cache, slot_mapping)


# key [T, Hkv, D] and value [T, Hkv, Dv] of token t -> slot slot_mapping[t] of the paged caches (an exact copy, in
# place; a negative slot, a padding token, writes nothing): what bi::paged_attention reads. On CUDA one Triton
# launch that reads the slots on the device (capturable in a CUDA graph).
library.define_op(
    "write_kv_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor slot_mapping) "
    "-> ()",
    fake=_write_kv_cache_fake, cpu=_write_kv_cache_torch, triton=_write_kv_cache_triton,
)
