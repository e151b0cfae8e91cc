"""Batch-invariant matrix products: ``bi::mm``, ``bi::addmm``, ``bi::bmm``, ``bi::linear``, ``bi::grouped_mm``.

All compute ``alpha * (A @ B) + beta * bias`` (grouped_mm: per group of rows, its own B, as
``torch._grouped_mm`` does for MoE experts) with fp32 accumulation and return a new contiguous
tensor in the input dtype. A row's bits depend only on that row, B, the bias and (K, dtype):

- CUDA / Ascend: the Triton kernel in ``bi_compile.kernels.matmul`` (a fixed K order per dtype; the tile
  config is chosen from the real M here, at run time, so torch.compile cannot freeze it);
- CPU: ``library.map_row_tiles`` cuts A into fixed [16, K] blocks, so every torch.mm call has one shape
  whatever M is; products are taken in fp32 and rounded once to the output dtype, like the GPU's fp32
  accumulator. This also needs the BLAS to give a row the same bits wherever it sits in its block: MKL
  (torch's x86 BLAS) does, as the tests check; OpenBLAS's sgemm (numpy's) does not.

fp16, bf16 and fp32 only (fp32 is true fp32, never TF32); A, B and bias share one dtype and device.
"""

from __future__ import annotations

import torch

from bi_compile.ops import library
from bi_compile.ops.library import Layout

# A is read along K with unit stride (rows may be strided); B may be row- or column-major, so a weight
# [N, K] is read in place as B = weight.t(); the bias is broadcast through its strides.
library.layout_contract("bi::mm", self=Layout.UNIT_STRIDE_ROWS, mat2=Layout.UNIT_STRIDE_ANY)
library.layout_contract("bi::addmm", self=Layout.ANY, mat1=Layout.UNIT_STRIDE_ROWS, mat2=Layout.UNIT_STRIDE_ANY)
library.layout_contract("bi::bmm", self=Layout.UNIT_STRIDE_ROWS, mat2=Layout.UNIT_STRIDE_ANY)
library.layout_contract("bi::linear", input=Layout.UNIT_STRIDE_ROWS, weight=Layout.UNIT_STRIDE_ANY, bias=Layout.ANY)
library.layout_contract("bi::grouped_mm", self=Layout.UNIT_STRIDE_ROWS, mat2=Layout.UNIT_STRIDE_ANY, offs=Layout.CONTIGUOUS)


# ---- checks (run by the fake impls at trace time and by the kernels at run time) ----


def _check_operands(op: str, lhs_rank: int, rhs_rank: int, **tensors: torch.Tensor | None) -> None:
    """Supported dtype, one dtype and one device for all; the first two tensors (the matrices) have the given ranks."""
    library.check_dtype(op, **tensors)
    (lhs_name, lhs), (rhs_name, rhs) = list(tensors.items())[:2]
    library.check_rank(op, (lhs_rank,), **{lhs_name: lhs})
    library.check_rank(op, (rhs_rank,), **{rhs_name: rhs})
    present = {name: t for name, t in tensors.items() if t is not None}
    if len({t.dtype for t in present.values()}) > 1:
        raise library.reject(op, "all tensors must have one dtype", **present)
    if len({t.device for t in present.values()}) > 1:
        raise library.reject(op, "all tensors must be on one device", **present)


def _check_inner(op: str, k_lhs, k_rhs, **tensors: torch.Tensor) -> None:
    if k_lhs != k_rhs:
        raise library.reject(op, f"inner dimensions differ ({k_lhs} vs {k_rhs})", **tensors)


@library.memoized_on_metadata
def _check_mm(self: torch.Tensor, mat2: torch.Tensor) -> None:
    _check_operands("bi::mm", 2, 2, self=self, mat2=mat2)
    _check_inner("bi::mm", self.shape[1], mat2.shape[0], self=self, mat2=mat2)


@library.memoized_on_metadata
def _check_addmm(self: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor) -> None:
    _check_operands("bi::addmm", 2, 2, mat1=mat1, mat2=mat2, self=self)
    _check_inner("bi::addmm", mat1.shape[1], mat2.shape[0], mat1=mat1, mat2=mat2)
    out_shape = (mat1.shape[0], mat2.shape[1])
    trailing = zip(reversed(self.shape), reversed(out_shape))
    if self.dim() > 2 or not all(size == 1 or size == target for size, target in trailing):
        raise library.reject("bi::addmm", f"'self' does not broadcast to the product's shape {out_shape}", self=self)


@library.memoized_on_metadata
def _check_bmm(self: torch.Tensor, mat2: torch.Tensor) -> None:
    _check_operands("bi::bmm", 3, 3, self=self, mat2=mat2)
    if self.shape[0] != mat2.shape[0]:
        raise library.reject("bi::bmm", "batch sizes differ", self=self, mat2=mat2)
    _check_inner("bi::bmm", self.shape[2], mat2.shape[1], self=self, mat2=mat2)


@library.memoized_on_metadata
def _check_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if input.dim() == 0:
        raise library.reject("bi::linear", "'input' must have at least one dim", input=input)
    _check_operands("bi::linear", input.dim(), 2, input=input, weight=weight, bias=bias)
    _check_inner("bi::linear", input.shape[-1], weight.shape[1], input=input, weight=weight)
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise library.reject("bi::linear", f"'bias' must have shape ({weight.shape[0]},)", bias=bias, weight=weight)


# ---- CPU: batch-invariant by construction ----


def _cpu_product(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, alpha: float, beta: float) -> torch.Tensor:
    """alpha * (a @ b) + beta * bias for a [M, K], b [K, N], bias broadcastable to [M, N]: fp32 math, then
    one rounding to a.dtype."""
    b32 = b.float()
    out = library.map_row_tiles(lambda rows: torch.mm(rows.float(), b32), a)
    if alpha != 1.0:
        out = out * alpha
    if bias is not None and beta != 0.0:
        out = out + (bias.float() if beta == 1.0 else beta * bias.float())
    return out.to(a.dtype)


# ---- the ops ----


def _mm_fake(self, mat2):
    _check_mm(self, mat2)
    return self.new_empty((self.shape[0], mat2.shape[1]))


def _mm_cpu(self, mat2):
    _check_mm(self, mat2)
    library.check_layout("bi::mm", self=self, mat2=mat2)
    return _cpu_product(self, mat2, None, 1.0, 1.0)


def _mm_triton(self, mat2):
    from bi_compile.kernels import matmul as kernels

    _check_mm(self, mat2)
    library.check_layout("bi::mm", self=self, mat2=mat2)
    return kernels.matmul(self[None], mat2[None])[0]


# [M, K] @ [K, N] -> [M, N].
library.define_op("mm(Tensor self, Tensor mat2) -> Tensor", fake=_mm_fake, cpu=_mm_cpu, triton=_mm_triton)


def _addmm_fake(self, mat1, mat2, *, beta=1.0, alpha=1.0):
    _check_addmm(self, mat1, mat2)
    return mat1.new_empty((mat1.shape[0], mat2.shape[1]))


def _addmm_cpu(self, mat1, mat2, *, beta=1.0, alpha=1.0):
    _check_addmm(self, mat1, mat2)
    library.check_layout("bi::addmm", self=self, mat1=mat1, mat2=mat2)
    return _cpu_product(mat1, mat2, self, alpha, beta)


def _addmm_triton(self, mat1, mat2, *, beta=1.0, alpha=1.0):
    from bi_compile.kernels import matmul as kernels

    _check_addmm(self, mat1, mat2)
    library.check_layout("bi::addmm", self=self, mat1=mat1, mat2=mat2)
    bias = self.expand(mat1.shape[0], mat2.shape[1])[None]
    return kernels.matmul(mat1[None], mat2[None], bias, alpha=alpha, beta=beta)[0]


# beta * self + alpha * ([M, K] @ [K, N]) -> [M, N]; self broadcasts to [M, N] and is ignored when beta == 0.
library.define_op("addmm(Tensor self, Tensor mat1, Tensor mat2, *, float beta=1., float alpha=1.) -> Tensor",
                  fake=_addmm_fake, cpu=_addmm_cpu, triton=_addmm_triton)


def _bmm_fake(self, mat2):
    _check_bmm(self, mat2)
    return self.new_empty((self.shape[0], self.shape[1], mat2.shape[2]))


def _bmm_cpu(self, mat2):
    _check_bmm(self, mat2)
    library.check_layout("bi::bmm", self=self, mat2=mat2)
    if self.shape[0] == 0:
        return self.new_empty((0, self.shape[1], mat2.shape[2]))
    # One matrix at a time: torch.bmm's blocking could depend on the batch count.
    return torch.stack([_cpu_product(a, b, None, 1.0, 1.0) for a, b in zip(self, mat2)])


def _bmm_triton(self, mat2):
    from bi_compile.kernels import matmul as kernels

    _check_bmm(self, mat2)
    library.check_layout("bi::bmm", self=self, mat2=mat2)
    return kernels.matmul(self, mat2)


# [B, M, K] @ [B, K, N] -> [B, M, N].
library.define_op("bmm(Tensor self, Tensor mat2) -> Tensor", fake=_bmm_fake, cpu=_bmm_cpu, triton=_bmm_triton)


def _linear_fake(input, weight, bias=None):
    _check_linear(input, weight, bias)
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


def _linear_cpu(input, weight, bias=None):
    _check_linear(input, weight, bias)
    library.check_layout("bi::linear", input=input, weight=weight, bias=bias)
    rows = input.reshape(input.shape[:-1].numel(), input.shape[-1])
    return _cpu_product(rows, weight.t(), bias, 1.0, 1.0).view(*input.shape[:-1], weight.shape[0])


@library.memoized_on_metadata
def _linear_plan(input, weight, bias):
    """The inputs checked and the kernel's launch planned, once per layout: a compiled graph's later calls with
    that layout cost one lookup here (docs/benchmarks.md, "Prefill outside CUDA graphs")."""
    from bi_compile.kernels import matmul as kernels

    _check_linear(input, weight, bias)
    library.check_layout("bi::linear", input=input, weight=weight, bias=bias)
    return kernels.plan_linear(input, weight, bias)


def _linear_triton(input, weight, bias=None):
    from bi_compile.kernels import matmul as kernels

    plan = _linear_plan(input, weight, bias)
    if plan is None:  # leading dims that merge into no rows view (a sliced 4-D input, say): copied once
        input = input.contiguous()
        plan = _linear_plan(input, weight, bias)
    return kernels.launch_linear(plan, input, weight, bias)


# input [..., K] @ weight[N, K].T + bias[N] -> [..., N]; the weight is read in place, never transposed.
library.define_op("linear(Tensor input, Tensor weight, Tensor? bias=None) -> Tensor",
                  fake=_linear_fake, cpu=_linear_cpu, triton=_linear_triton)


@library.native_launch("bi::linear")
def _native_linear(arguments: dict) -> library.NativeLaunch | None:
    """``linear``'s launch for Inductor to emit (kernels.matmul.emit_linear) where the operands are contiguous on
    a CUDA device and K and N are static (the tile ranges follow from N); the tiles still follow the run-time M."""
    input, weight, bias = arguments["input"], arguments["weight"], arguments["bias"]
    if (not all(map(library.emits_in_place, (input, weight, bias))) or not isinstance(input.shape[-1], int)
            or not isinstance(weight.shape[0], int)):
        return None
    names = ("input", "weight") if bias is None else ("input", "weight", "bias")

    def trace(input, weight, *bias):  # make_fx gives a placeholder per parameter: no defaults
        from bi_compile.kernels.matmul import emit_linear

        return emit_linear(input, weight, bias[0] if bias else None)

    return library.NativeLaunch(names, trace)


@library.native_launch("bi::addmm")
def _native_addmm(arguments: dict) -> library.NativeLaunch | None:
    """``addmm``'s launch for Inductor to emit where it is a linear layer: ``bias[N] + mat1 @ mat2`` (beta and alpha
    1), as GPT-2's Conv1D computes it with its [K, N] weight, read in place as the [N, K] weight's transpose
    (kernels.matmul.emit_linear); the same conditions as ``linear``'s otherwise."""
    bias, mat1, mat2 = arguments["self"], arguments["mat1"], arguments["mat2"]
    weight = mat2.t()
    if (arguments["beta"] != 1 or arguments["alpha"] != 1 or bias.dim() != 1 or bias.shape[0] != mat2.shape[1]
            or not all(map(library.emits_in_place, (bias, mat1)))
            or not (library.emits_in_place(mat2) or library.emits_in_place(weight))
            or not isinstance(mat2.shape[0], int) or not isinstance(mat2.shape[1], int)):
        return None

    def trace(bias, mat1, mat2):
        from bi_compile.kernels.matmul import emit_linear

        return emit_linear(mat1, mat2.t(), bias)

    return library.NativeLaunch(("self", "mat1", "mat2"), trace)


@library.memoized_on_metadata
def _check_grouped_mm(self, mat2, offs) -> None:
    _check_operands("bi::grouped_mm", 2, 3, self=self, mat2=mat2)
    _check_inner("bi::grouped_mm", self.shape[1], mat2.shape[1], self=self, mat2=mat2)
    library.check_dtype("bi::grouped_mm", (torch.int32,), offs=offs)
    library.check_rank("bi::grouped_mm", (1,), offs=offs)
    if offs.shape[0] != mat2.shape[0] or offs.device != self.device:
        raise library.reject("bi::grouped_mm", "'offs' needs one entry per group of 'mat2', on the inputs' device",
                             offs=offs, mat2=mat2)
    library.check_layout("bi::grouped_mm", self=self, mat2=mat2, offs=offs)


def _grouped_mm_fake(self, mat2, offs):
    _check_grouped_mm(self, mat2, offs)
    return self.new_empty((self.shape[0], mat2.shape[2]))


def _grouped_mm_cpu(self, mat2, offs):
    _check_grouped_mm(self, mat2, offs)
    out = self.new_zeros((self.shape[0], mat2.shape[2]))
    start = 0
    for group, end in enumerate(offs.tolist()):
        end = min(end, self.shape[0])
        if end > start:  # each group through the fixed-tile CPU product: a row's bits ignore the group's size
            out[start:end] = _cpu_product(self[start:end], mat2[group], None, 1.0, 1.0)
        start = max(start, end)
    return out


def _grouped_mm_triton(self, mat2, offs):
    from bi_compile.kernels import matmul as kernels

    _check_grouped_mm(self, mat2, offs)
    return kernels.grouped_matmul(self, mat2, offs)


# Rows [offs[g - 1], offs[g]) of self [T, K] times mat2[g] [K, N] -> [T, N] (rows past offs[-1] are 0): the 2-D x 3-D
# form of ``torch._grouped_mm`` with which MoE layers run their experts. ``offs`` [G] int32, the cumulative row ends,
# non-decreasing and at most T (as torch requires; on the GPU they are read as data).
library.define_op("grouped_mm(Tensor self, Tensor mat2, Tensor offs) -> Tensor",
                  fake=_grouped_mm_fake, cpu=_grouped_mm_cpu, triton=_grouped_mm_triton)
