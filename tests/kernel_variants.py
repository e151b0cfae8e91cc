"""The kernel variants the offline compile checks build: every constexpr branch of every kernel, in each dtype,
through the project's own launchers, with the blockings of whatever target ``device.CPU_TARGET`` names.

Used by tests/ascend/compile_check.py (triton-ascend, an Ascend target) and tests/cuda_compile_check.py (Triton's
NVIDIA backend, an H100/H200 target). The launches run on CPU tensors; each check's stand-in driver makes them
compile for its device instead of running.
"""

from __future__ import annotations

import torch
from triton.backends.compiler import GPUTarget

from bi_compile.kernels import attention, cumsum, device, matmul, reduce, rms_norm, softmax


class StandInDriver:
    """What Triton's JIT asks of its driver before it compiles for ``target``; nothing launches. ``utils`` answers
    the device-property queries of the backends that make them (triton-ascend)."""

    def __init__(self, target: GPUTarget, utils=None):
        self.target, self.utils = target, utils

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device_index=None):
        return 0


def variant_key(jit_fn, args, kwargs, options=()) -> dict:
    """What names a launch's compiled variant: the dtype it compiles for (its first tensor argument's), its
    constexprs, and the launch ``options`` named (e.g. num_warps), in that order."""
    key = {"dtype": next(str(a.dtype).removeprefix("torch.") for a in args if isinstance(a, torch.Tensor))}
    key |= {p.name: kwargs[p.name] for p in jit_fn.params if p.is_constexpr and p.name in kwargs}
    return key | {name: kwargs[name] for name in options if name in kwargs}


DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def compile_variants() -> None:
    """Every constexpr branch of every kernel, in each dtype, and every matmul tile of the target's table."""
    for dtype in DTYPES:
        for k in (256, 200):  # EVEN_K, ragged K
            a = _randn(1, 37, k, dtype=dtype)
            w = _randn(96, k, dtype=dtype)
            matmul.matmul(a, w.t()[None])  # B unit stride along K
            matmul.matmul(a, w.t().contiguous()[None], _randn(1, 37, 96, dtype=dtype), beta=0.5)  # along N, bias
            ends = torch.tensor([10, 10, 37], dtype=torch.int32)
            matmul.grouped_matmul(a[0], _randn(3, k, 96, dtype=dtype), ends)
        for n_cols in (1000, 4096, 151936):  # packed rows, one chunk, a looped (vocab) row
            x = _randn(3, n_cols, dtype=dtype)
            reduce.row_sum(x, torch.float32)
            reduce.row_sum(x, dtype, mean=True, square=True)
            rms_norm.rms_norm(x, _randn(n_cols, dtype=dtype), 1e-6)
            rms_norm.rms_norm(x, None, 1e-6)
            rms_norm.add_rms_norm(x, x, _randn(n_cols, dtype=dtype), 1e-6)
            rms_norm.layer_norm(x, _randn(n_cols, dtype=dtype), _randn(n_cols, dtype=dtype), 1e-5)
            rms_norm.layer_norm(x, None, None, 1e-5)
            rms_norm.var_mean(x, 1.0, dtype)
            rms_norm.var_mean(x, 0.0, torch.float32, std=True)
            softmax.softmax(x, dtype)
            softmax.softmax(x, torch.float32, log=True)
            softmax.logsumexp(x, dtype)
            cumsum.cumsum(x, torch.float32)
        for head_dim in (64, 128, 256):
            q = _randn(2, 8, 5, head_dim, dtype=dtype)
            kv = _randn(2, 4, 700, head_dim, dtype=dtype)
            bool_mask = torch.rand(2, 8, 5, 700) > 0.3
            for split_kv in (False, True):
                attention.attention(q, kv, kv, None, True, 0.1, split_kv)
            attention.attention(q, kv, kv, bool_mask, False, 0.1, False)
            attention.attention(q, kv, kv, _randn(2, 8, 5, 700, dtype=dtype), False, 0.1, False)
        a = _randn(1, 300, 256, dtype=dtype)
        w = _randn(256, 256, dtype=dtype)
        for _, tiles in matmul.tile_table(device.CPU_TARGET)[dtype]:
            for tile in tiles:
                matmul.matmul(a, w.t()[None], tiles=tile)
