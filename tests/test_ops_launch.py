"""The keyed launch path (bi_compile/kernels/launch.py): after its first launch with a key, a kernel is called
through the binary Triton returned, so each launcher's key must determine that binary. GPU only: the interpreter
and triton-ascend always take Triton's own path.

    python3 -m pytest -m gpu tests/test_ops_launch.py        (benchmarks/gpu_run.sh tests-ops runs it)
"""

from __future__ import annotations

import pytest
import torch

from bi_compile.kernels import launch
from bi_compile.kernels.rms_norm import _rms_norm_kernel

pytestmark = pytest.mark.gpu


def _op_calls(g: torch.Generator):
    """Every kernel family at shapes and layouts that change its specialisation: odd and aligned sizes, row-strided
    and misaligned views, batch 1 and more, bias or none, fp32 and bf16, causal, masked and paged attention. Each
    call binds its tensors as defaults: the calls are collected before any runs, and the loop variables move on."""
    for dtype in (torch.bfloat16, torch.float32):
        base = torch.randn(301, 1040, device="cuda", generator=g).to(dtype)
        w = torch.randn(520, 1024, device="cuda", generator=g).to(dtype)
        bias = torch.randn(520, device="cuda", generator=g).to(dtype)
        norm_w = torch.randn(1024, device="cuda", generator=g).to(dtype)
        for m in (1, 2, 16, 17, 130, 300):
            x = base[:m, :1024]  # row stride 1040
            shifted = base[:m, 1:1025]  # data not 16-byte aligned
            yield lambda x=x, w=w: torch.ops.bi.linear(x, w)
            yield lambda x=x, w=w, bias=bias: torch.ops.bi.linear(x, w, bias)
            yield lambda x=shifted, w=w: torch.ops.bi.linear(x, w)
            yield lambda x=x, w=w: torch.ops.bi.mm(x, w.t())
            yield lambda x=x, norm_w=norm_w: torch.ops.bi.rms_norm(x, norm_w, 1e-6)
            yield lambda x=shifted, norm_w=norm_w: torch.ops.bi.add_rms_norm(x, x, norm_w, 1e-6)
            yield lambda x=x: torch.ops.bi.softmax(x, -1, False)
            yield lambda x=shifted, half=dtype != torch.float32: torch.ops.bi.log_softmax(x, -1, half)
            yield lambda x=x: torch.ops.bi.sum(x, [-1], False, torch.float32)
            yield lambda x=x: torch.ops.bi.mean(x, [0], True, None)
            yield lambda x=x: torch.ops.bi.mean_square(x, [-1], True)
            yield lambda x=shifted: torch.ops.bi.mean_square(x, [-1], True)
            yield lambda x=x, w=w: torch.ops.bi.linear(x[None].expand(2, -1, -1), w)  # a batch of matrices, stride 0
        for batch, q_len, kv_len in ((1, 1, 2048), (3, 16, 16), (2, 7, 600)):
            q = torch.randn(batch, q_len, 8, 128, device="cuda", generator=g).to(dtype).transpose(1, 2)
            kv = torch.randn(batch, kv_len, 4, 128, device="cuda", generator=g).to(dtype).transpose(1, 2)
            mask = torch.rand(batch, 1, q_len, kv_len, device="cuda", generator=g) > 0.3
            yield lambda q=q, kv=kv: torch.ops.bi.attention(q, kv, kv, None, 0.0, True, None, True)
            yield lambda q=q, kv=kv, mask=mask: torch.ops.bi.attention(q, kv, kv, mask, 0.0, False, None, True)
            yield lambda q=q, kv=kv[:1], mask=mask[0, 0]: torch.ops.bi.attention(q, kv, kv, mask, 0.0, False, None, True)
        # Paged attention: decodes (split keys) and a prefill chunk, int32 and int64 metadata, caches that are views of
        # one tensor, the values' data not 16-byte aligned.
        cache = torch.randn(40, 4, 16, 200, device="cuda", generator=g).to(dtype)
        key_cache, value_cache = cache[..., :128], cache[..., 130:194]
        table = torch.randperm(40, device="cuda", generator=g)[:36].view(4, 9)
        for index, q_lens in ((torch.int32, (1, 1, 1, 1)), (torch.int64, (1, 30, 2, 0))):
            seq_lens = torch.tensor([140, 33, 70, 5], dtype=index, device="cuda")
            starts = torch.tensor([0, *q_lens], dtype=index, device="cuda").cumsum(0).to(index)
            q = torch.randn(sum(q_lens) + 2, 8, 128, device="cuda", generator=g).to(dtype)
            yield lambda q=q, key_cache=key_cache, value_cache=value_cache, table=table.to(index), seq_lens=seq_lens, \
                starts=starts, bound=max(q_lens): torch.ops.bi.paged_attention(q, key_cache, value_cache, table,
                                                                               seq_lens, starts, 0.1, bound, 1024)
        # The KV-cache write: key and value views of one qkv row (the values' data not 16-byte aligned) into a cache
        # of its own, int32 and int64 slots with padding; the call returns the cache.
        qkv = torch.randn(5, 1800, device="cuda", generator=g).to(dtype)
        write_cache = torch.zeros(40, 4, 16, 200, device="cuda", dtype=dtype)
        for index in (torch.int32, torch.int64):
            slots = torch.tensor([3, -1, 77, 140, 9], dtype=index, device="cuda")
            yield lambda qkv=qkv, cache=write_cache, slots=slots: (torch.ops.bi.write_kv_cache(
                qkv[:, 1024:1536].view(5, 4, 128), qkv[:, 1538:1794].view(5, 4, 64), cache[..., :128],
                cache[..., 130:194], slots), cache.clone())[1]


def test_every_launch_key_maps_to_the_binary_triton_picks(monkeypatch):
    """Each call twice, with the key check on: the second call of each takes the direct path, and the check asks
    Triton's own binding for the binary every time and raises if the key led elsewhere. The bits match."""
    monkeypatch.setattr(launch, "CHECK_KEYS", True)
    calls = list(_op_calls(torch.Generator(device="cuda").manual_seed(0)))
    first = [call() for call in calls]
    second = [call() for call in calls]
    for a, b in zip(first, second):
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert torch.equal(x, y)


def test_control_a_key_that_misses_a_specialisation_is_caught(monkeypatch):
    """Control: a launcher whose key ignores the alignment of its input would reuse an aligned binary for a
    misaligned row; the key check refuses it."""
    monkeypatch.setattr(launch, "CHECK_KEYS", True)
    careless = launch.KeyedKernel(_rms_norm_kernel)
    base = torch.randn(4, 1040, device="cuda")
    y, rstd = torch.empty(4, 1024, device="cuda"), torch.empty(4, 1, device="cuda")

    def run(x):
        careless(x.device, "one key for every input", (4,), x, x, x, x, y, y, rstd, rstd,
                 4, 1024, 1, 1040, 0, 1040, 0, 1e-6, 1.0,
                 HAS_X2=False, HAS_W=False, HAS_B=False, CENTER=False, STAT=0, FUSED=True, BLOCK=1024, ROWS=1,
                 num_warps=4)

    run(base[:, :1024])
    with pytest.raises(launch.LaunchKeyError):
        run(base[:, 1:1025])


def test_direct_launches_call_the_launch_hooks_a_profiler_sets():
    """The direct path passes Triton's launch hooks on when one is set (profilers see every launch) and none when
    none is; control: the same calls after the hook is removed reach it no more."""
    from triton import knobs

    calls = list(_op_calls(torch.Generator(device="cuda").manual_seed(1)))[:12]
    for call in calls:  # every key known: the calls below take the direct path
        call()
    seen = []
    knobs.runtime.launch_enter_hook.add(seen.append)
    try:
        for call in calls:
            call()
        torch.cuda.synchronize()
    finally:
        knobs.runtime.launch_enter_hook.remove(seen.append)
    assert len(seen) >= len(calls)
    count = len(seen)
    for call in calls:
        call()
    assert len(seen) == count
