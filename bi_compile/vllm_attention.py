"""``BI_ATTN``: a vLLM attention backend whose every query row is reduced in an order fixed by its own position
(``torch.ops.bi.paged_attention``: pure PyTorch on CPUs, bi-compile's Triton attention on GPUs).

vLLM takes it through its backend registry: it is the class behind ``AttentionBackendEnum.CUSTOM``
(``register_backend``), and with ``BI_COMPILE_VLLM=1`` bi-compile's platform (``bi_compile.vllm_platform``) selects
it. The KV cache of a layer is vLLM's logical ``[num_blocks, Hkv, block_size, D + Dv]`` (0.32; the same shape is
returned by ``get_kv_cache_shape`` for releases that ask the backend for it), read through its strides in any
physical layout vLLM picks: the keys are ``[..., :D]``, the values ``[..., D:]``.

Supported: decoder self-attention, causal, fp16/bf16/fp32 with an unquantized cache, head dims up to 256, decode and
chunked prefill. Refused, naming the feature: ALiBi, sliding windows, logit soft-capping, attention sinks, other
attention types, quantized KV caches, fused output quantization, decode context parallelism.

Written against vLLM 0.26 (GPU) and 0.32 (CPU), one body for both (bi_compile/vllm_compat.py names what differs
and checks the installed vLLM): 0.26's runner asks ``get_kv_cache_shape``, 0.32's resolves the layout itself.

CUDA graphs: on CUDA the builder declares ``AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE``, so vLLM captures full
graphs of uniform decode steps (FULL_DECODE_ONLY, or the decode half of FULL_AND_PIECEWISE) and runs the other
steps eagerly or piecewise. A graph replays one launch grid, so a uniform decode step passes
``torch.ops.bi.paged_attention`` static bounds, ``max_query_len = 1`` and ``max_seq_len = max_model_len``, whatever
its requests' lengths (the kernel's grid depends on the rows, heads, dtypes and the two bounds only; a larger
bound never changes a bit); every other step passes its own. The rows are the query's (vLLM pads a graph's step
to its capture size), so the builder needs no capture sizes. The KV-cache write (``torch.ops.bi.write_kv_cache``)
makes no device-to-host read either: it reads the slots on the device and skips padding tokens (slot -1). On a
CPU the builder declares no graph support (``NEVER``; vLLM runs no CUDA graphs there).

This module imports vLLM: only the platform imports it, in a vLLM process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)

import bi_compile.ops  # noqa: F401  (defines torch.ops.bi.paged_attention)
from bi_compile.ops.paged_attention import MAX_HEAD_DIM
from bi_compile.vllm_checks import RAN, VllmSettingError, platform_kind

NAME = "BI_ATTN"  # in messages; vLLM knows it by its enum member
# vLLM 0.32's Attention layer looks ``get_name()`` up in AttentionBackendEnum: it must be the member's name.
ENUM_MEMBER = "CUSTOM"


@dataclass
class BiAttentionMetadata:
    """What one step's attention reads, straight from vLLM's ``CommonAttentionMetadata``."""

    num_actual_tokens: int  # tokens of real requests; later rows of the step are padding
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [R + 1] int32
    seq_lens: torch.Tensor  # [R] int32
    block_table: torch.Tensor  # [R, max blocks] int32
    slot_mapping: torch.Tensor  # [tokens] int64, -1 for tokens that write no slot


class BiAttentionMetadataBuilder(AttentionMetadataBuilder[BiAttentionMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if vllm_config.parallel_config.decode_context_parallel_size > 1:
            raise VllmSettingError(f"{NAME} does not split the KV cache across ranks: drop "
                                   "--decode-context-parallel-size")
        # The static bound on a request's length for a uniform decode step (captured once, replayed for all).
        self.max_model_len = vllm_config.model_config.max_model_len

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        """Full CUDA graphs of uniform decode steps on a GPU (the op is capture-safe there); none on a CPU."""
        if platform_kind() == "gpu":
            return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        return AttentionCGSupport.NEVER

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> BiAttentionMetadata:
        common = common_attn_metadata
        if common.causal is not True:
            raise VllmSettingError(f"{NAME} runs causal decoder attention only (got causal={common.causal!r})")
        if common.max_query_len == 1:  # a uniform decode step: bounds that hold for every replay of its graph
            max_query_len, max_seq_len = 1, self.max_model_len
        else:
            max_query_len, max_seq_len = common.max_query_len, common.max_seq_len
        return BiAttentionMetadata(
            num_actual_tokens=common.num_actual_tokens, max_query_len=max_query_len, max_seq_len=max_seq_len,
            query_start_loc=common.query_start_loc, seq_lens=common.seq_lens,
            block_table=common.block_table_tensor, slot_mapping=common.slot_mapping,
        )


def split_kv_cache(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's [num_blocks, Hkv, block_size, D + Dv] cache -> key and value views [.., D] and [.., Dv]."""
    return kv_cache.split([head_size, kv_cache.shape[-1] - head_size], dim=-1)


class BiAttentionImpl(AttentionImpl[BiAttentionMetadata]):
    supports_dcp: bool = False  # 0.26's AttentionImpl says True by default

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: str | None = None,
                 sinks: torch.Tensor | None = None) -> None:
        unsupported = {
            "ALiBi slopes": alibi_slopes is not None,
            f"sliding window {sliding_window}": sliding_window not in (None, -1),
            f"logits soft cap {logits_soft_cap}": logits_soft_cap not in (None, 0),
            f"attention type {attn_type}": attn_type != AttentionType.DECODER,
            f"KV cache dtype {kv_cache_dtype}": kv_cache_dtype not in BiAttentionBackend.supported_kv_cache_dtypes,
            "attention sinks": sinks is not None,
        }
        refused = [feature for feature, present in unsupported.items() if present]
        if refused:
            raise VllmSettingError(f"{NAME} (bi-compile's batch-invariant attention) does not support "
                                   + ", ".join(refused))
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        """Write the step's keys and values into their slots (an exact copy; padding tokens, slot < 0, write
        nothing): ``bi::write_kv_cache``, one launch on a GPU that a CUDA graph can capture."""
        key_cache, value_cache = split_kv_cache(kv_cache, self.head_size)
        torch.ops.bi.write_kv_cache(key, value, key_cache, value_cache, slot_mapping)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: BiAttentionMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None, output_block_scale: torch.Tensor | None = None,
                ) -> torch.Tensor:
        """query [tokens, H, D] -> output [tokens, H, Dv] (written in place; rows past the real tokens untouched)."""
        if output_scale is not None or output_block_scale is not None:
            raise VllmSettingError(f"{NAME} does not fuse output quantization")
        if attn_metadata is None:  # vLLM's profiling and warm-up runs
            return output
        tokens = attn_metadata.num_actual_tokens
        RAN["BI_ATTN forward"] += 1
        key_cache, value_cache = split_kv_cache(kv_cache, self.head_size)
        output[:tokens] = torch.ops.bi.paged_attention(
            query[:tokens], key_cache, value_cache, attn_metadata.block_table, attn_metadata.seq_lens,
            attn_metadata.query_start_loc, self.scale, attn_metadata.max_query_len, attn_metadata.max_seq_len,
        ).reshape(output[:tokens].shape)
        return output


class BiAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return ENUM_MEMBER

    @staticmethod
    def get_impl_cls() -> type[BiAttentionImpl]:
        return BiAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[BiAttentionMetadataBuilder]:
        return BiAttentionMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        """Asked by 0.26's model runner (abstract there; 0.32 no longer asks): the logical layout 0.32 gives every
        backend, [blocks, Hkv, block_size, D + Dv] with Dv = D."""
        return num_blocks, num_kv_heads, block_size, 2 * head_size

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return 0 < head_size <= MAX_HEAD_DIM

    @classmethod
    def supports_batch_invariance(cls) -> bool:
        return True
