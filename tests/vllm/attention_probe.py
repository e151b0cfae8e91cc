"""Probe, in a fresh process with vLLM imported (as in a vLLM process), bi-compile's attention backend and platform
through vLLM's own types (0.32 here; the same probe reads vLLM 0.26's where it is importable), without an engine;
print the facts as JSON for test_vllm_attention.py."""

from __future__ import annotations

import json
import math
import os
import types

import torch

MAX_MODEL_LEN = 2048


def builder_config(dcp: int = 1):
    """What BI_ATTN's metadata builder reads of a VllmConfig."""
    return types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=MAX_MODEL_LEN),
                                 parallel_config=types.SimpleNamespace(decode_context_parallel_size=dcp))


def backend_round_trip(facts: dict) -> None:
    """A step of two requests (a decode and a prefill chunk) through the metadata builder, the KV-cache write and
    forward, on a [blocks, Hkv, block_size, D + Dv] cache; compared with float64 attention."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from bi_compile.vllm_attention import BiAttentionBackend

    heads, kv_heads, dim, block_size = 4, 2, 32, 16
    g = torch.Generator().manual_seed(0)
    seq_lens, q_lens = [40, 21], [1, 5]
    keys = [torch.randn(n, kv_heads, dim, generator=g) for n in seq_lens]
    values = [torch.randn(n, kv_heads, dim, generator=g) for n in seq_lens]
    queries = [torch.randn(l, heads, dim, generator=g) for l in q_lens]
    kv_cache = torch.full((12, kv_heads, block_size, 2 * dim), math.nan)
    block_table = torch.tensor([[7, 2, 9, 0], [4, 11, 0, 0]], dtype=torch.int32)
    impl = BiAttentionBackend.get_impl_cls()(heads, dim, dim ** -0.5, kv_heads, None, None, "auto")

    def slots(r: int, positions) -> torch.Tensor:
        return torch.tensor([int(block_table[r, j // block_size]) * block_size + j % block_size for j in positions])

    for r, n in enumerate(seq_lens):  # the cached context, then the step's own tokens (as vLLM does)
        context = range(n - q_lens[r])
        impl.do_kv_cache_update(None, keys[r][:len(context)], values[r][:len(context)], kv_cache, slots(r, context))
    step_slots = torch.cat([slots(r, range(n - q_lens[r], n)) for r, n in enumerate(seq_lens)] + [torch.tensor([-1])])
    new_keys = torch.cat([k[-l:] for k, l in zip(keys, q_lens)] + [torch.zeros(1, kv_heads, dim)])
    new_values = torch.cat([v[-l:] for v, l in zip(values, q_lens)] + [torch.zeros(1, kv_heads, dim)])
    impl.do_kv_cache_update(None, new_keys, new_values, kv_cache, step_slots)

    starts = torch.tensor([0, 1, 6], dtype=torch.int32)
    common = CommonAttentionMetadata(
        query_start_loc=starts, query_start_loc_cpu=starts, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        num_reqs=2, num_actual_tokens=6, max_query_len=5, max_seq_len=40, block_table_tensor=block_table,
        slot_mapping=step_slots)
    builder = BiAttentionBackend.get_builder_cls()(None, [], builder_config(), torch.device("cpu"))
    metadata = builder.build(0, common)
    facts["mixed_step_bounds"] = [metadata.max_query_len, metadata.max_seq_len]
    query = torch.cat(queries + [torch.randn(1, heads, dim, generator=g)])
    output = torch.full((7, heads * dim), 7.0)
    impl.forward(None, query, None, None, kv_cache, metadata, output)

    errors = []
    for r, (q, k, v) in enumerate(zip(queries, keys, values)):
        n, l = seq_lens[r], q_lens[r]
        visible = torch.arange(n)[None, :] <= torch.arange(n - l, n)[:, None]
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.double().transpose(0, 1), k.double().transpose(0, 1).repeat_interleave(2, 0),
            v.double().transpose(0, 1).repeat_interleave(2, 0), attn_mask=visible, scale=dim ** -0.5)
        got = output[starts[r]:starts[r + 1]].view(l, heads, dim).transpose(0, 1).double()
        errors.append((got - ref).abs().max().item())
    facts["round_trip_max_error"] = max(errors)
    facts["padding_row_untouched"] = bool((output[6] == 7.0).all())
    # The padding token's slot (-1) wrote nowhere: only the requests' own slots hold keys.
    written = ~kv_cache.isnan().all(-1).all(1)  # [blocks, block_size]: slots written
    facts["written_slots"] = sorted(written.nonzero().tolist())
    facts["request_slots"] = sorted([int(s) // block_size, int(s) % block_size]
                                    for r, n in enumerate(seq_lens) for s in slots(r, range(n)))

    # A uniform decode step of the same two requests: bounds fixed by the model, not by the step, and the same bits
    # (the bounds only size the GPU kernel's grid).
    decode_starts = torch.tensor([0, 1, 2], dtype=torch.int32)
    decode = CommonAttentionMetadata(
        query_start_loc=decode_starts, query_start_loc_cpu=decode_starts,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), num_reqs=2, num_actual_tokens=2, max_query_len=1,
        max_seq_len=40, block_table_tensor=block_table, slot_mapping=torch.tensor([-1, -1]))
    decode_metadata = builder.build(0, decode)
    facts["decode_step_bounds"] = [decode_metadata.max_query_len, decode_metadata.max_seq_len]
    last = torch.stack([queries[0][-1], queries[1][-1]])
    out_static = torch.zeros(2, heads * dim)
    impl.forward(None, last, None, None, kv_cache, decode_metadata, out_static)
    decode_metadata.max_query_len, decode_metadata.max_seq_len = 1, 40  # the step's own bounds
    out_own = torch.zeros(2, heads * dim)
    impl.forward(None, last, None, None, kv_cache, decode_metadata, out_own)
    facts["decode_static_bounds_same_bits"] = torch.equal(out_static, out_own)
    facts["decode_matches_mixed_step"] = torch.equal(out_static[0], output[0]) and \
        torch.equal(out_static[1], output[5])


def graph_support_facts(facts: dict) -> None:
    """What the builder declares to vLLM's CUDA-graph mode resolution, per platform kind, and the DCP refusal."""
    from unittest import mock

    from bi_compile import vllm_attention, vllm_checks

    builder = vllm_attention.BiAttentionMetadataBuilder
    facts["cudagraph_support_here"] = builder.get_cudagraph_support(None, None).name
    with mock.patch.object(vllm_attention, "platform_kind", return_value="gpu"):
        facts["cudagraph_support_gpu"] = builder.get_cudagraph_support(None, None).name
    try:
        builder(None, [], builder_config(dcp=2), torch.device("cpu"))
        facts["dcp_error"] = None
    except vllm_checks.VllmSettingError as error:
        facts["dcp_error"] = str(error)
    facts["impl_supports_dcp"] = vllm_attention.BiAttentionImpl.supports_dcp


def main() -> None:
    os.environ.pop("BI_COMPILE_VLLM", None)
    import vllm  # noqa: F401  (first, as in every vLLM process)
    from vllm.config import AttentionConfig
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import AttentionSelectorConfig

    from bi_compile import vllm_checks, vllm_platform

    facts = {"off_platform": vllm_platform.platform_plugin()}
    os.environ["BI_COMPILE_VLLM"] = "1"
    facts["on_platform"] = vllm_platform.platform_plugin()

    config = AttentionConfig()
    vllm_platform.select_attention(config)
    facts["selected"] = config.backend.name
    try:
        vllm_platform.select_attention(AttentionConfig(backend="FLASH_ATTN"))
        facts["named_error"] = None
    except vllm_checks.VllmSettingError as error:
        facts["named_error"] = str(error)

    platform = vllm_platform.BiCpuPlatform
    selector = AttentionSelectorConfig(head_size=64, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=16)
    facts["custom_path"] = platform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, selector)
    facts["unselected_path"] = platform.get_attn_backend_cls(None, selector)
    facts["same_class"] = vllm_platform.BiCpuPlatform is platform
    try:
        platform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, selector._replace(head_size=512))
        facts["refused_head_size"] = None
    except vllm_checks.VllmSettingError as error:
        facts["refused_head_size"] = str(error)
    try:
        from bi_compile.vllm_attention import BiAttentionImpl

        BiAttentionImpl(4, 64, 0.125, 2, sliding_window=128, logits_soft_cap=30.0)
        facts["refused_features"] = None
    except vllm_checks.VllmSettingError as error:
        facts["refused_features"] = str(error)
    backend_round_trip(facts)
    graph_support_facts(facts)
    print("PROBE " + json.dumps(facts))


if __name__ == "__main__":
    main()
