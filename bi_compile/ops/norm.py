"""``bi::rms_norm``, ``bi::add_rms_norm`` and ``bi::layer_norm``: norms over the last dim, batch-invariant on every
device.

    rms_norm(input [..., N], weight [N] | None, eps) -> (y [..., N] input.dtype, rstd [..., 1] fp32)
        rstd = rsqrt(mean(x_f32 ** 2) + eps);  y = (x_f32 * rstd * w_f32).to(input.dtype)
    add_rms_norm(x1, x2, weight, eps) -> (y, rstd, s)
        s = x1 + x2 rounded to the input dtype (exactly torch's x1 + x2), then rms_norm(s):
        the outputs of torch_npu.npu_add_rms_norm and of vLLM's fused_add_rms_norm (y, and s as the new residual).
    layer_norm(input [..., N], weight [N] | None, bias [N] | None, eps) -> (y [..., N], mean [..., 1], rstd [..., 1])
        mean = mean(x_f32);  rstd = rsqrt(mean((x_f32 - mean) ** 2) + eps);  y = ((x_f32 - mean) * rstd * w + b)
        y in the input dtype, mean and rstd fp32: aten.native_layer_norm's outputs (which on CPU keep half inputs'
        statistics in their dtype; the graph pass maps those only where the graph does not read them).

The weight and bias may have another float dtype than the input (fp32 parameters with bf16 activations).
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
library.layout_contract("bi::layer_norm", input=Layout.UNIT_STRIDE_ROWS, weight=Layout.UNIT_STRIDE_ROWS,
                        bias=Layout.UNIT_STRIDE_ROWS)


@library.memoized_on_metadata
def _check(op: str, weight: torch.Tensor | None, bias: torch.Tensor | None = None, **inputs: torch.Tensor) -> None:
    """Dtypes, ranks, shapes, devices and layout of the inputs (``inputs``: input, or x1 and x2)."""
    library.check_dtype(op, weight=weight, bias=bias, **inputs)
    x = next(iter(inputs.values()))
    if x.dim() == 0:
        raise library.reject(op, "needs at least one dim to normalise over", **inputs)
    if any(t.shape != x.shape or t.dtype != x.dtype for t in inputs.values()):
        raise library.reject(op, "x1 and x2 must have the same shape and dtype", **inputs)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dim() != 1 or t.shape[0] != x.shape[-1]):
            raise library.reject(op, f"{name} must have shape [{x.shape[-1]}] (the last dim of the input)", **{name: t},
                                 **inputs)
    if any(t.device != x.device for t in (weight, bias, *inputs.values()) if t is not None):
        raise library.reject(op, "all tensors must be on one device", weight=weight, bias=bias, **inputs)
    library.check_layout(op, weight=weight, bias=bias, **inputs)


@library.memoized_on_metadata
def _triton_plan(op: str, center: bool, weight: torch.Tensor | None, bias: torch.Tensor | None = None,
                 **inputs: torch.Tensor):
    """The inputs checked and the kernel's launch planned, once per layout: a compiled graph's later calls with
    that layout cost one lookup here (docs/benchmarks.md, "Prefill outside CUDA graphs"). None where the kernel
    copies the rows first (kernels.rms_norm.plan_norm)."""
    from bi_compile.kernels.rms_norm import plan_norm

    _check(op, weight, bias, **inputs)
    x1, *x2 = inputs.values()
    return plan_norm(x1, x2[0] if x2 else None, weight, bias, center)


def _flat_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., N] as contiguous [M, N] (a copy only for a strided x)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).contiguous()


def _rms_norm_cpu_rows(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU path: rstd from fixed [tile, N] blocks (library.map_row_tiles), then elementwise y."""
    rows = _flat_rows(x)
    rstd = library.map_row_tiles(lambda tile: torch.rsqrt(tile.float().square().mean(-1, keepdim=True) + eps), rows)
    y = rows.float() * rstd
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype).reshape(x.shape), rstd.reshape(x.shape[:-1] + (1,))


def _layer_norm_cpu_rows(x, weight, bias, eps):
    """CPU path: mean and rstd from fixed [tile, N] blocks (library.map_row_tiles), then elementwise y."""

    def tile_stats(tile: torch.Tensor) -> torch.Tensor:
        values = tile.float()
        mean = values.mean(-1, keepdim=True)
        return torch.cat([mean, torch.rsqrt((values - mean).square().mean(-1, keepdim=True) + eps)], -1)

    rows = _flat_rows(x)
    stats = library.map_row_tiles(tile_stats, rows)
    # Two fresh contiguous tensors: outputs of an op may not alias each other.
    mean, rstd = (stats[:, i : i + 1].clone(memory_format=torch.contiguous_format) for i in (0, 1))
    y = (rows.float() - mean) * rstd
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    stats_shape = x.shape[:-1] + (1,)
    return y.to(x.dtype).reshape(x.shape), mean.reshape(stats_shape), rstd.reshape(stats_shape)


def _rms_norm_fake(input, weight, eps):
    _check("bi::rms_norm", weight, input=input)
    return input.new_empty(input.shape), input.new_empty(input.shape[:-1] + (1,), dtype=torch.float32)


def _rms_norm_cpu(input, weight, eps):
    _check("bi::rms_norm", weight, input=input)
    return _rms_norm_cpu_rows(input, weight, eps)


def _rms_norm_triton(input, weight, eps):
    from bi_compile.kernels.rms_norm import rms_norm as launch

    return launch(input, weight, eps, plan=_triton_plan("bi::rms_norm", False, weight, input=input))


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
    from bi_compile.kernels.rms_norm import add_rms_norm as launch

    return launch(x1, x2, weight, eps, plan=_triton_plan("bi::add_rms_norm", False, weight, x1=x1, x2=x2))


library.define_op("add_rms_norm(Tensor x1, Tensor x2, Tensor? weight, float eps) -> (Tensor, Tensor, Tensor)",
                  fake=_add_rms_norm_fake, cpu=_add_rms_norm_cpu, triton=_add_rms_norm_triton)


def _with_eps_tensor(op: str, impl, *, read: bool):
    """``impl`` of a norm for ``op``, its ``eps_tensor`` overload, whose last argument, eps, is the 0-dim CPU tensor
    that torch.compile makes of a float it traces as an input (an RMSNorm module's epsilon): ``impl`` gets its value,
    read on the host (``read``), or 0.0 (the fake impls, which read no data)."""

    def call(*args):
        *inputs, eps = args
        if eps.dim() != 0 or eps.device.type != "cpu" or not eps.is_floating_point():
            raise library.reject(op, "eps must be a float, or a 0-dim floating CPU tensor", eps=eps)
        return impl(*inputs, eps.item() if read else 0.0)

    return call


# The same norms with eps as a tensor: what passes/written_rms_norm.py writes where the epsilon is a graph input.
for _schema, (_fake, _cpu, _triton) in (
    ("rms_norm.eps_tensor(Tensor input, Tensor? weight, Tensor eps) -> (Tensor, Tensor)",
     (_rms_norm_fake, _rms_norm_cpu, _rms_norm_triton)),
    ("add_rms_norm.eps_tensor(Tensor x1, Tensor x2, Tensor? weight, Tensor eps) -> (Tensor, Tensor, Tensor)",
     (_add_rms_norm_fake, _add_rms_norm_cpu, _add_rms_norm_triton)),
):
    _op = "bi::" + _schema.split("(", 1)[0]
    library.define_op(_schema, fake=_with_eps_tensor(_op, _fake, read=False),
                      cpu=_with_eps_tensor(_op, _cpu, read=True), triton=_with_eps_tensor(_op, _triton, read=True))


def _layer_norm_fake(input, weight, bias, eps):
    _check("bi::layer_norm", weight, bias, input=input)
    stats = input.new_empty(input.shape[:-1] + (1,), dtype=torch.float32)
    return input.new_empty(input.shape), stats, stats.new_empty(stats.shape)


def _layer_norm_cpu(input, weight, bias, eps):
    _check("bi::layer_norm", weight, bias, input=input)
    return _layer_norm_cpu_rows(input, weight, bias, eps)


def _layer_norm_triton(input, weight, bias, eps):
    from bi_compile.kernels.rms_norm import layer_norm as launch

    return launch(input, weight, bias, eps, plan=_triton_plan("bi::layer_norm", True, weight, bias, input=input))


library.define_op("layer_norm(Tensor input, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)",
                  fake=_layer_norm_fake, cpu=_layer_norm_cpu, triton=_layer_norm_triton)


def _native_norm(inputs: tuple[str, ...], center: bool, outputs: tuple[str, ...]):
    """A norm's ``library.NativeLaunch`` where its tensors are contiguous on a CUDA device and the row length is
    static (the blocking follows from it). eps is a float, or (the ``eps_tensor`` overloads) the 0-dim CPU tensor
    whose value the launch reads at run time, as the op does: Inductor emits the read (``.item()``) before it."""

    def plan(arguments: dict) -> library.NativeLaunch | None:
        tensors = {name: arguments[name] for name in (*inputs, "weight", "bias") if name in arguments}
        eps = arguments["eps"]
        if (not isinstance(arguments[inputs[0]].shape[-1], int)
                or not all(map(library.emits_in_place, tensors.values()))):
            return None
        names = tuple(name for name, t in tensors.items() if t is not None)
        if isinstance(eps, torch.Tensor):
            if eps.dim() != 0 or eps.device.type != "cpu" or not eps.is_floating_point():
                return None  # the op call raises its error
            names += ("eps",)

        def trace(*values):
            from bi_compile.kernels.rms_norm import emit_norm

            given = dict(zip(names, values))
            x1, *x2 = (given[name] for name in inputs)
            y, mean, rstd, s = emit_norm(x1, x2[0] if x2 else None, given.get("weight"), given.get("bias"),
                                         library.host_scalar(given["eps"]) if "eps" in given else eps, center)
            found = {"y": y, "mean": mean, "rstd": rstd, "s": s}
            return tuple(found[name] for name in outputs)

        return library.NativeLaunch(names, trace)

    return plan


library.native_launch("bi::rms_norm")(_native_norm(("input",), False, ("y", "rstd")))
library.native_launch("bi::add_rms_norm")(_native_norm(("x1", "x2"), False, ("y", "rstd", "s")))
library.native_launch("bi::layer_norm")(_native_norm(("input",), True, ("y", "mean", "rstd")))
