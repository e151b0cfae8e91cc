"""Write a step's new keys and values into a paged KV cache (Triton), the GPU kernel behind ``bi::write_kv_cache``:
an exact copy, one launch for the whole step of a layer.

Token t's key [Hkv, D] goes to slot ``slot_mapping[t] % block_size`` of block ``slot_mapping[t] // block_size`` of
the key cache [blocks, Hkv, block_size, D] (any strides, unit last stride), its value likewise; a negative slot (a
padding token) writes nothing. One program per (token, kv head); the slot is read on the device, so a CUDA graph
can capture the launch and replay it with new slots.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .attention import head_block
from .device import launch_options, target
from .launch import KeyedKernel, aligned16


@triton.jit
def _write_kv_cache_kernel(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_kb, stride_kch, stride_ks, stride_vb, stride_vch, stride_vs,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        d = tl.arange(0, BLOCK_D)
        key = tl.load(key_ptr + token * stride_kt + head * stride_kh + d, mask=d < HEAD_DIM)
        tl.store(key_cache_ptr + block * stride_kb + head * stride_kch + offset * stride_ks + d, key,
                 mask=d < HEAD_DIM)
        dv = tl.arange(0, BLOCK_DV)
        value = tl.load(value_ptr + token * stride_vt + head * stride_vh + dv, mask=dv < VALUE_DIM)
        tl.store(value_cache_ptr + block * stride_vb + head * stride_vch + offset * stride_vs + dv, value,
                 mask=dv < VALUE_DIM)


@functools.lru_cache(maxsize=1024)
def _meta(head_dim: int, value_dim: int, block_size: int, device: torch.device) -> dict:
    return dict(HEAD_DIM=head_dim, VALUE_DIM=value_dim, BLOCK_SIZE=block_size, BLOCK_D=head_block(head_dim),
                BLOCK_DV=head_block(value_dim), **launch_options(target(device).backend, 4))


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """key [T, Hkv, D], value [T, Hkv, Dv] -> their slots of key_cache [blocks, Hkv, block_size, D] and
    value_cache [.., Dv] (in place) for the first ``min(T, len(slot_mapping))`` tokens; inputs unchecked."""
    tokens = min(key.shape[0], slot_mapping.shape[0])
    if tokens == 0:
        return
    kv_heads, block_size = key_cache.shape[1], key_cache.shape[2]
    strides = (*key.stride()[:2], *value.stride()[:2], *key_cache.stride()[:3], *value_cache.stride()[:3])
    meta = _meta(key.shape[2], value.shape[2], block_size, key.device)
    key_of_launch = (key.device, key.shape[2], value.shape[2], block_size, strides, key.dtype, slot_mapping.dtype,
                     aligned16(key), aligned16(value), aligned16(key_cache), aligned16(value_cache),
                     aligned16(slot_mapping))
    _write_launch(key.device, key_of_launch, (tokens, kv_heads), key, value, key_cache, value_cache, slot_mapping,
                  *strides, **meta)


_write_launch = KeyedKernel(_write_kv_cache_kernel)
