"""``bi::attention``: ``F.scaled_dot_product_attention`` with a reduction order fixed by the key positions.

    out[b, h, i] = sum_j softmax_j(scale * q[b, h, i] . k[b, h // G, j] + bias[b, h, i, j]) v[b, h // G, j]

query [B, H, L, D], key [B, Hkv, S, D], value [B, Hkv, S, Dv] -> [B, H, L, Dv] (fresh, in the query's dtype,
laid out [B, L, H, Dv] in memory as FlashAttention's output is). Semantics are SDPA's:

- ``scale`` defaults to 1 / sqrt(D);
- ``attn_mask`` broadcasts to [B, H, L, S]: bool (True = attend) or additive float (fp32 or the query's dtype);
- ``is_causal``: key j is visible to query i iff j <= i (top-left aligned ``tril(ones(L, S))``, so a lone
  decode query sees key 0 only); together with a mask both apply, as in torch's fused CPU/CUDA kernels;
- GQA/MQA: ``enable_gqa=True`` with Hkv dividing H; without it Hkv must be H or 1 (SDPA's broadcast);
  key/value batch 1 broadcasts too;
- a row with every key masked gives 0 (what torch's CPU SDPA returns, math and fused paths alike).

Supported: fp16, bf16, fp32 (q, k, v one dtype), D and Dv up to 256, ``dropout_p == 0``; anything else is a
``BIInputError``. A query row's bits depend only on its own q, keys, values and mask row: never on the batch,
the number of heads, where the row sits or the padding rows after its sequence's queries (L). The cache length
S does not matter either when the slots past a sequence's keys are masked (a static KV cache): keys are
reduced in fixed chunks anchored at key 0 and a masked chunk leaves the softmax state bit-identical.

- CUDA / Ascend: ``bi_compile.kernels.attention`` (fixed BLOCK_N chunks within fixed 512-key splits, merged
  in order; see its docstring).
- CPU: :func:`_attention_cpu`, pure PyTorch in fp32 with fixed-shape tiles (below).
"""

from __future__ import annotations

import math

import torch

from bi_compile.ops import library
from bi_compile.ops.library import Layout

OP = "bi::attention"
MAX_HEAD_DIM = 256

# The kernels read q, k and v with unit stride along the head dim (any batch/head/position strides, so a
# [B, L, H, D] projection viewed as [B, H, L, D] needs no copy); the mask is read through its strides
# (broadcast masks keep their 0 strides).
library.layout_contract(
    OP, query=Layout.UNIT_STRIDE_ROWS, key=Layout.UNIT_STRIDE_ROWS, value=Layout.UNIT_STRIDE_ROWS, attn_mask=Layout.ANY
)

# CPU tiling: packed query rows (position, head in group) per tile, keys per online-softmax step (anchored at
# key 0), and tiles per library call. Every torch call in the CPU path sees one shape per (D, Dv, S rounded up).
CPU_QUERY_TILE = 16
CPU_KEY_CHUNK = 64
CPU_TILES_PER_CALL = 32


# ---- checks (the fake impl runs them at trace time, the kernels at run time) ----


@library.memoized_on_metadata
def _check(query, key, value, attn_mask, dropout_p: float, enable_gqa: bool) -> None:
    tensors = dict(query=query, key=key, value=value, attn_mask=attn_mask)
    if dropout_p != 0.0:
        raise library.reject(OP, f"dropout_p must be 0 (got {dropout_p}): dropout is not batch-invariant", **tensors)
    library.check_dtype(OP, query=query, key=key, value=value)
    library.check_rank(OP, (4,), query=query, key=key, value=value)
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise library.reject(OP, "query, key and value must have one dtype", **tensors)
    if len({t.device for t in tensors.values() if t is not None}) > 1:
        raise library.reject(OP, "all tensors must be on one device", **tensors)
    batch, heads, q_len, head_dim = query.shape
    kv_batch, kv_heads, kv_len, key_dim = key.shape
    if tuple(value.shape[:3]) != (kv_batch, kv_heads, kv_len):
        raise library.reject(OP, "key and value must agree in batch, heads and length", key=key, value=value)
    if kv_batch != batch and kv_batch != 1:
        raise library.reject(OP, "key/value batch must be the query's or 1", **tensors)
    if key_dim != head_dim:
        raise library.reject(OP, "query and key head dims differ", query=query, key=key)
    if not (0 < head_dim <= MAX_HEAD_DIM and 0 < value.shape[3] <= MAX_HEAD_DIM):
        raise library.reject(OP, f"head dims must be in 1..{MAX_HEAD_DIM}", query=query, value=value)
    if kv_heads == 0 or heads % kv_heads != 0:
        raise library.reject(OP, "the number of key/value heads must divide the number of query heads", **tensors)
    if not enable_gqa and kv_heads != heads and kv_heads != 1:
        raise library.reject(OP, "key/value heads differ from query heads: pass enable_gqa=True", **tensors)
    if attn_mask is not None:
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            raise library.reject(OP, "attn_mask must be bool, float32 or the query's dtype", attn_mask=attn_mask, query=query)
        target = (batch, heads, q_len, kv_len)
        trailing = zip(reversed(attn_mask.shape), reversed(target))
        if attn_mask.dim() > 4 or not all(size == full or size == 1 for size, full in trailing):
            raise library.reject(OP, f"attn_mask does not broadcast to {target}", attn_mask=attn_mask)


def _broadcast(query, key, value, attn_mask):
    """key/value as [B, Hkv, S, *] and the mask as [B, H, L, S], all views (stride 0 where broadcast)."""
    batch, heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    key = key.expand(batch, -1, -1, -1)
    value = value.expand(batch, -1, -1, -1)
    mask = None if attn_mask is None else attn_mask.expand(batch, heads, q_len, kv_len)
    return key, value, mask


# ---- CPU: batch-invariant by construction ----


def _attend_tiles(q, k, v, bias, scale: float) -> torch.Tensor:
    """Online softmax over CPU_KEY_CHUNK-key steps for T independent tiles, all fp32:
    q [T, R, D], k [T, S', D], v [T, S', Dv], bias [T, R, S'] (-inf = masked; S' a multiple of the chunk)
    -> [T, R, Dv]. Rows with every key masked give 0."""
    tiles, rows, _ = q.shape
    m = q.new_full((tiles, rows, 1), -math.inf)
    l = q.new_zeros((tiles, rows, 1))
    acc = q.new_zeros((tiles, rows, v.shape[2]))
    for first in range(0, k.shape[1], CPU_KEY_CHUNK):
        keys = slice(first, first + CPU_KEY_CHUNK)
        s = torch.bmm(q, k[:, keys].transpose(1, 2)) * scale + bias[:, :, keys]
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        shift = torch.where(m_new == -math.inf, 0.0, m_new)  # no -inf - -inf while a row has seen no key
        alpha = torch.exp(m - shift)
        p = torch.exp(s - shift)
        l = l * alpha + p.sum(-1, keepdim=True)
        acc = acc * alpha + torch.bmm(p, v[:, keys])
        m = m_new
    return acc / torch.where(l == 0, 1.0, l)


def _score_bias(mask, is_causal: bool, q_len: int, kv_len: int, padded_len: int) -> torch.Tensor:
    """Additive fp32 bias broadcastable to [B, H, L, S']: 0 or the mask's value where visible, -inf elsewhere
    (masked, not causal, or a padding key >= S)."""
    keys = torch.arange(padded_len)
    bias = torch.zeros(q_len, padded_len).masked_fill(keys >= kv_len, -math.inf)
    if is_causal:
        bias = bias.masked_fill(keys[None, :] > torch.arange(q_len)[:, None], -math.inf)
    if mask is None:
        return bias
    pad = (0, padded_len - kv_len)
    if mask.dtype == torch.bool:
        return bias.masked_fill(~torch.nn.functional.pad(mask, pad, value=True), -math.inf)
    return bias + torch.nn.functional.pad(mask.float(), pad)


def _attention_cpu(query, key, value, mask, is_causal: bool, scale: float) -> torch.Tensor:
    """Query rows are packed per (sequence, kv head) as r = position * G + head-in-group, cut into tiles of
    CPU_QUERY_TILE rows anchored at r = 0; every tile is attended with its own kv head's keys by
    :func:`_attend_tiles` in calls of exactly CPU_TILES_PER_CALL tiles (``library.map_row_tiles`` over tile
    indices). A row's slot in its tile never depends on the batch, and each torch call has one shape, so a
    row cannot see how many rows came with it."""
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len, value_dim = key.shape[1], key.shape[2], value.shape[3]
    group = heads // kv_heads
    rows = q_len * group
    row_tiles = -(-rows // CPU_QUERY_TILE)
    padded_rows = row_tiles * CPU_QUERY_TILE
    padded_len = -(-kv_len // CPU_KEY_CHUNK) * CPU_KEY_CHUNK

    def packed(x: torch.Tensor) -> torch.Tensor:
        """[B, H, L, X] -> [B * Hkv * row_tiles, CPU_QUERY_TILE, X] (padding rows are 0)."""
        x = x.expand(batch, heads, q_len, x.shape[-1]).reshape(batch, kv_heads, group, q_len, x.shape[-1])
        x = x.transpose(2, 3).reshape(batch * kv_heads, rows, x.shape[-1])
        x = torch.nn.functional.pad(x, (0, 0, 0, padded_rows - rows))
        return x.reshape(batch * kv_heads * row_tiles, CPU_QUERY_TILE, x.shape[-1])

    q = packed(query.float())
    bias = packed(_score_bias(mask, is_causal, q_len, kv_len, padded_len).expand(batch, heads, q_len, padded_len))
    k = torch.nn.functional.pad(key.float(), (0, 0, 0, padded_len - kv_len)).reshape(batch * kv_heads, padded_len, head_dim)
    v = torch.nn.functional.pad(value.float(), (0, 0, 0, padded_len - kv_len)).reshape(batch * kv_heads, padded_len, value_dim)

    def attend(tile_ids: torch.Tensor) -> torch.Tensor:
        tiles = tile_ids[:, 0]
        pairs = tiles // row_tiles
        return _attend_tiles(q[tiles], k[pairs], v[pairs], bias[tiles], scale)

    # map_row_tiles pads the last call with tile index 0: recomputed, then dropped.
    out = library.map_row_tiles(attend, torch.arange(q.shape[0])[:, None], tile=CPU_TILES_PER_CALL)
    out = out.reshape(batch, kv_heads, padded_rows, value_dim)[:, :, :rows]
    out = out.reshape(batch, kv_heads, q_len, group, value_dim).transpose(2, 3)
    return out.reshape(batch, heads, q_len, value_dim).contiguous().to(query.dtype)


# ---- the op ----


def _new_output(query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The op's output, [B, H, L, Dv] laid out [B, L, H, Dv] in memory as FlashAttention's is (and as the Triton
    kernel writes it): a model's next step, transpose(1, 2) and a reshape to [B, L, H * Dv] for the output
    projection, is then a view instead of a copy kernel."""
    batch, heads, q_len, _ = query.shape
    return query.new_empty((batch, q_len, heads, value.shape[3])).transpose(1, 2)


def _attention_fake(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    _check(query, key, value, attn_mask, dropout_p, enable_gqa)
    return _new_output(query, value)


def _prepare(query, key, value, attn_mask, dropout_p, scale, enable_gqa):
    _check(query, key, value, attn_mask, dropout_p, enable_gqa)
    library.check_layout(OP, query=query, key=key, value=value, attn_mask=attn_mask)
    key, value, mask = _broadcast(query, key, value, attn_mask)
    return key, value, mask, 1.0 / math.sqrt(query.shape[3]) if scale is None else scale


def _attention_on_cpu(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    key, value, mask, scale = _prepare(query, key, value, attn_mask, dropout_p, scale, enable_gqa)
    return _new_output(query, value).copy_(_attention_cpu(query, key, value, mask, is_causal, scale))


@library.memoized_on_metadata
def _triton_plan(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa):
    """The inputs checked and the kernel's launch planned, once per layout: a compiled graph's later calls with
    that layout cost one lookup here (docs/benchmarks.md, "Prefill outside CUDA graphs")."""
    from bi_compile.kernels import attention as kernels

    key, value, mask, _ = _prepare(query, key, value, attn_mask, dropout_p, 1.0, enable_gqa)
    return kernels.plan_attention(query, key, value, mask, is_causal)


def _attention_triton(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    from bi_compile.kernels import attention as kernels

    plan = _triton_plan(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    scale = 1.0 / math.sqrt(query.shape[3]) if scale is None else scale
    # key, value and the mask are read through their broadcast views' strides (the plan's) from their own data.
    return kernels.launch_attention(plan, query, key, value, attn_mask, scale)


# Batch-invariant ``F.scaled_dot_product_attention``: [B, H, L, D] x [B, Hkv, S, D] x [B, Hkv, S, Dv] -> [B, H, L, Dv].
library.define_op(
    "attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, float dropout_p=0., "
    "bool is_causal=False, float? scale=None, bool enable_gqa=False) -> Tensor",
    fake=_attention_fake, cpu=_attention_on_cpu, triton=_attention_triton,
)


@library.native_launch(OP)
def _native_attention(arguments: dict) -> library.NativeLaunch | None:
    """``attention``'s launches for Inductor to emit (kernels.attention.emit_attention) where every operand is
    16-byte aligned on a CUDA device (the kernel reads them through their strides, so they need not be contiguous) and
    the head counts and dims are static (the blocks follow from them); the schedule follows the run-time sizes."""
    query, key, value, mask = (arguments[name] for name in ("query", "key", "value", "attn_mask"))
    if (arguments["dropout_p"] != 0.0 or not all(map(library.launches_aligned, (query, key, value, mask)))
            or not all(isinstance(size, int) for size in (*query.shape[1::2], key.shape[1], value.shape[3]))):
        return None
    names = ("query", "key", "value") if mask is None else ("query", "key", "value", "attn_mask")
    is_causal = arguments["is_causal"]
    scale = 1.0 / math.sqrt(query.shape[3]) if arguments["scale"] is None else arguments["scale"]

    def trace(query, key, value, *mask):
        from bi_compile.kernels.attention import emit_attention

        return emit_attention(query, key, value, mask[0] if mask else None, is_causal, scale)

    return library.NativeLaunch(names, trace)
