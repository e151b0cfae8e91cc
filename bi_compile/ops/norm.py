"""``bi::rms_norm`` and ``bi::add_rms_norm``: RMSNorm over the last dim, batch-invariant on every device.

    rms_norm(input [..., N], weight [N] | None, eps) -> (y [..., N] input.dtype, rstd [..., 1] fp32)
        rstd = rsqrt(mean(x_f32 ** 2) + eps);  y = (x_f32 * rstd * w_f32).to(input.dtype)
    add_rms_norm(x1, x2, weight, eps) -> (y, rstd, s)
        s = x1 + x2 rounded to the input dtype (exactly torch's x1 + x2), then rms_norm(s):
        the outputs of torch_npu.npu_add_rms_norm and of vLLM's fused_add_rms_norm (y, and s as the new residual).

The weight may have another float dtype than the input (an fp32 weight with bf16 activations).
"""

from __future__ import annotations

import math

import torch

from bi_compile.ops import library
from bi_compile.ops.library import Layout

# The kernel takes two row strides, so row-strided and head-split views ([T, H, D] cut from a fused qkv) are
# read in place; it needs unit stride along N. The weight is read as a contiguous [N].
library.layout_contract("bi::rms_norm", input=Layout.UNIT_STRIDE_ROWS, weight=Layout.UNIT_STRIDE_ROWS)
library.layout_contract("bi::add_rms_norm", x1=Layout.UNIT_STRIDE_ROWS, x2=Layout.UNIT_STRIDE_ROWS,
                        weight=Layout.UNIT_STRIDE_ROWS)


@library.memoized_on_metadata
def _check(op: str, weight: torch.Tensor | None, **inputs: torch.Tensor) -> None:
    """Dtypes, ranks, shapes, devices and layout of the inputs (``inputs``: input, or x1 and x2)."""
    library.check_dtype(op, weight=weight, **inputs)
    x = next(iter(inputs.values()))
    if x.dim() == 0:
        raise library.reject(op, "needs at least one dim to normalise over", **inputs)
    if any(t.shape != x.shape or t.dtype != x.dtype for t in inputs.values()):
        raise library.reject(op, "x1 and x2 must have the same shape and dtype", **inputs)
    if weight is not None and (weight.dim() != 1 or weight.shape[0] != x.shape[-1]):
        raise library.reject(op, f"weight must have shape [{x.shape[-1]}] (the last dim of the input)", weight=weight,
                             **inputs)
    if any(t.device != x.device for t in (weight, *inputs.values()) if t is not None):
        raise library.reject(op, "all tensors must be on one device", weight=weight, **inputs)
    library.check_layout(op, weight=weight, **inputs)


def _rms_norm_cpu_rows(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU path: rstd from fixed [tile, N] blocks (library.map_row_tiles), then elementwise y."""
    n = x.shape[-1]
    rows = x.reshape(math.prod(x.shape[:-1]), n).contiguous()
    rstd = library.map_row_tiles(lambda tile: torch.rsqrt(tile.float().square().mean(-1, keepdim=True) + eps), rows)
    y = rows.float() * rstd
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype).reshape(x.shape), rstd.reshape(x.shape[:-1] + (1,))


def _rms_norm_fake(input, weight, eps):
    _check("bi::rms_norm", weight, input=input)
    return input.new_empty(input.shape), input.new_empty(input.shape[:-1] + (1,), dtype=torch.float32)


def _rms_norm_cpu(input, weight, eps):
    _check("bi::rms_norm", weight, input=input)
    return _rms_norm_cpu_rows(input, weight, eps)


def _rms_norm_triton(input, weight, eps):
    _check("bi::rms_norm", weight, input=input)
    from bi_compile.kernels.rms_norm import rms_norm as launch

    return launch(input, weight, eps)


library.define_op("rms_norm(Tensor input, Tensor? weight, float eps) -> (Tensor, Tensor)",
                  fake=_rms_norm_fake, cpu=_rms_norm_cpu, triton=_rms_norm_triton)


def _add_rms_norm_fake(x1, x2, weight, eps):
    _check("bi::add_rms_norm", weight, x1=x1, x2=x2)
    return x1.new_empty(x1.shape), x1.new_empty(x1.shape[:-1] + (1,), dtype=torch.float32), x1.new_empty(x1.shape)


def _add_rms_norm_cpu(x1, x2, weight, eps):
    _check("bi::add_rms_norm", weight, x1=x1, x2=x2)
    s = torch.add(x1, x2, out=torch.empty(x1.shape, dtype=x1.dtype))  # contiguous, whatever x1/x2's strides
    y, rstd = _rms_norm_cpu_rows(s, weight, eps)
    return y, rstd, s


def _add_rms_norm_triton(x1, x2, weight, eps):
    _check("bi::add_rms_norm", weight, x1=x1, x2=x2)
    from bi_compile.kernels.rms_norm import add_rms_norm as launch

    return launch(x1, x2, weight, eps)


library.define_op("add_rms_norm(Tensor x1, Tensor x2, Tensor? weight, float eps) -> (Tensor, Tensor, Tensor)",
                  fake=_add_rms_norm_fake, cpu=_add_rms_norm_cpu, triton=_add_rms_norm_triton)
