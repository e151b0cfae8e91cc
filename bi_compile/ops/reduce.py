"""The row reductions with a fixed order: ``bi::sum``, ``bi::mean`` and ``bi::mean_square`` (aten ``sum.dim_IntList`` /
``mean.dim``), ``bi::l2_norm`` (``linalg_vector_norm`` of order 2), ``bi::var_mean`` and ``bi::std_mean`` (aten
``var_mean`` / ``std_mean``, and ``var`` / ``std`` as their first output) and ``bi::logsumexp``.

    sum(self, dim, keepdim=False, dtype=None), mean(self, dim, keepdim=False, dtype=None)
    mean_square(self, dim, keepdim=False) = mean(self.float() ** 2, dim, keepdim), fp32
    l2_norm(self, dim, keepdim=False) = sqrt(sum(self.float() ** 2)), in self's dtype
    var_mean(self, dim, correction=1, keepdim=False) = (sum((x - mean) ** 2) / max(R - correction, 0), mean)
    std_mean(...) = (sqrt of that variance, mean);   logsumexp(self, dim, keepdim=False) = log(sum(exp(self)))

``mean_square`` is the variance of an RMSNorm written out in a model (``x.float().pow(2).mean(-1, True)``,
transformers' norms): it reads x in its own dtype, so the squares never go through memory, and the rest of the
norm stays the model's own elementwise code, which Inductor fuses around it.

``dim``: a list of dims (negative ones wrap; None or [] reduces every dim). ``dtype``: the output dtype; as
in aten each element is cast to it first, and the sum is accumulated in fp32 whatever it is. mean = sum / R.

The reduced dims are moved last and flattened into one row of length R; each output element is the fixed-chunk
reduction of its row. That is free when the reduced dims already are the trailing, contiguous ones (the
usual x.sum(-1) / x.mean(-1, keepdim=True)); otherwise it costs one copy of the input. Floating inputs only:
integer sums are exact, so the graph pass leaves them to aten. All math is fp32, results in the input dtype (sum and
mean: the ``dtype`` argument). Sums and means of long rows are split across programs (``kernels/reduce.py``); the
variance (two passes over the row, in ``kernels/rms_norm.py``) and logsumexp (``kernels/softmax.py``) take one
program per row, so ``x.var()`` over a whole large tensor runs on one SM: correct and invariant, not fast. The mean
of var_mean / std_mean is ``x.mean()``'s: a row of finite values and infs of one sign has that inf as its mean, where
aten's Welford mean says NaN (the variance is NaN in both).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from bi_compile.ops import library
from bi_compile.ops.library import Layout

# Any strides: the op itself moves the reduced dims last (a copy only when they are not one unit-stride run),
# so the graph pass never has to insert one.
library.layout_contract("bi::sum", self=Layout.ANY)
library.layout_contract("bi::mean", self=Layout.ANY)
library.layout_contract("bi::mean_square", self=Layout.ANY)
library.layout_contract("bi::l2_norm", self=Layout.ANY)
library.layout_contract("bi::var_mean", self=Layout.ANY)
library.layout_contract("bi::std_mean", self=Layout.ANY)
library.layout_contract("bi::logsumexp", self=Layout.ANY)


class _Plan(NamedTuple):
    order: tuple[int, ...]  # permutation: kept dims, then reduced dims
    n_kept: int
    out_shape: tuple  # of ints or SymInts
    out_dtype: torch.dtype


@library.memoized_on_metadata
def _plan(op: str, x: torch.Tensor, dim: Sequence[int] | None, keepdim: bool, dtype: torch.dtype | None) -> _Plan:
    """Validate; return how to lay the input out as rows and what to return."""
    library.check_dtype(op, self=x)
    out_dtype = library.out_dtype(op, x, dtype)
    span = max(x.dim(), 1)  # a 0-dim tensor takes dim 0 or -1, as in aten
    reduced: list[int] = []
    for d in dim or range(x.dim()):
        if not -span <= d < span:
            raise library.reject(op, f"dim {d} out of range for a rank-{x.dim()} tensor", self=x)
        if d % span in reduced:
            raise library.reject(op, f"dim {d % span} appears more than once in dim={list(dim)}", self=x)
        reduced.append(d % span)
    kept = [d for d in range(x.dim()) if d not in reduced]
    if keepdim:
        out_shape = tuple(1 if d in reduced else x.shape[d] for d in range(x.dim()))
    else:
        out_shape = tuple(x.shape[d] for d in kept)
    moved = tuple(sorted(r for r in reduced if r < x.dim()))  # a 0-dim input has no dim to move
    return _Plan(tuple(kept) + moved, len(kept), out_shape, out_dtype)


def _as_rows(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """x as [*kept, R]: a view when the reduced dims are one run, else a copy."""
    moved = x.reshape(1) if x.dim() == 0 else x.permute(plan.order)
    return moved.reshape(*moved.shape[: plan.n_kept], math.prod(moved.shape[plan.n_kept:]))


def _flat_rows(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """x as [M, R] rows (M = the number of outputs), for the CPU paths."""
    rows = _as_rows(x, plan)
    return rows.reshape(math.prod(rows.shape[:-1]), rows.shape[-1])


class _Kind(NamedTuple):
    name: str
    mean: bool
    square: bool
    root: bool = False  # the square root of the result (l2_norm)


SUM, MEAN, MEAN_SQUARE = _Kind("bi::sum", False, False), _Kind("bi::mean", True, False), _Kind("bi::mean_square", True, True)
L2_NORM = _Kind("bi::l2_norm", False, True, root=True)


def _fake(kind: _Kind, x, dim, keepdim=False, dtype=None):
    plan = _plan(kind.name, x, dim, keepdim, dtype)
    return x.new_empty(plan.out_shape, dtype=plan.out_dtype)


def _cpu(kind: _Kind, x, dim, keepdim=False, dtype=None):
    """CPU path: fp32 sums of fixed [tile, R] blocks (library.map_row_tiles)."""
    plan = _plan(kind.name, x, dim, keepdim, dtype)
    rows = _flat_rows(x, plan)
    n_cols = rows.shape[-1]

    def tile_sums(tile: torch.Tensor) -> torch.Tensor:
        values = tile.to(plan.out_dtype).float()
        total = (values * values if kind.square else values).sum(-1)
        total = total.sqrt() if kind.root else total
        return (total / n_cols if kind.mean else total).to(plan.out_dtype)

    return library.map_row_tiles(tile_sums, rows).reshape(plan.out_shape)


@library.memoized_on_metadata
def _in_place_launch(kind: _Kind, x: torch.Tensor, dim, keepdim: bool, dtype):
    """The kernel's launch planned once per layout where the rows are a view of ``x`` that one launch reads in
    place (kernels.reduce.plan_row_sum), else None: a compiled graph's later calls cost one lookup here
    (docs/benchmarks.md, "Prefill outside CUDA graphs")."""
    from bi_compile.kernels.reduce import plan_row_sum

    plan = _plan(kind.name, x, dim, keepdim, dtype)
    if kind.root:
        return None
    meta = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
    rows = _as_rows(meta, plan)
    if rows is not meta and rows._base is not meta:  # the rows are a copy
        return None
    return plan_row_sum(rows, x.device, plan.out_dtype, kind.mean, kind.square, plan.out_shape)


def _triton(kind: _Kind, x, dim, keepdim=False, dtype=None):
    from bi_compile.kernels.reduce import launch_row_sum, row_sum

    launch = _in_place_launch(kind, x, dim, keepdim, dtype)
    if launch is not None and x.data_ptr() % 16 == 0:
        return launch_row_sum(launch, x)
    plan = _plan(kind.name, x, dim, keepdim, dtype)
    rows = _as_rows(x, plan)
    if kind.root:  # the root of the fp32 sum of squares (its elements widened from the input dtype: exact)
        return row_sum(rows, torch.float32, square=True).sqrt_().to(plan.out_dtype).reshape(plan.out_shape)
    return row_sum(rows, plan.out_dtype, mean=kind.mean, square=kind.square).reshape(plan.out_shape)


for _name, _kind, _dtype, _schema in (
    ("sum", SUM, None, "(Tensor self, int[]? dim, bool keepdim=False, ScalarType? dtype=None) -> Tensor"),
    ("mean", MEAN, None, "(Tensor self, int[]? dim, bool keepdim=False, ScalarType? dtype=None) -> Tensor"),
    # mean_square always computes and returns fp32: it passes that as the dtype argument of its sum/mean siblings.
    ("mean_square", MEAN_SQUARE, torch.float32, "(Tensor self, int[]? dim, bool keepdim=False) -> Tensor"),
    ("l2_norm", L2_NORM, None, "(Tensor self, int[]? dim, bool keepdim=False) -> Tensor"),
):
    _fixed = {} if _dtype is None else {"dtype": _dtype}
    library.define_op(_name + _schema, fake=functools.partial(_fake, _kind, **_fixed),
                      cpu=functools.partial(_cpu, _kind, **_fixed), triton=functools.partial(_triton, _kind, **_fixed))


def _moments_name(std: bool) -> str:
    return "bi::std_mean" if std else "bi::var_mean"


def _moments_fake(std: bool, x, dim, correction=1.0, keepdim=False):
    plan = _plan(_moments_name(std), x, dim, keepdim, None)
    return x.new_empty(plan.out_shape), x.new_empty(plan.out_shape)


def _moments_cpu(std: bool, x, dim, correction=1.0, keepdim=False):
    """CPU path: mean, then the centred squares, of fixed [tile, R] blocks (library.map_row_tiles)."""
    plan = _plan(_moments_name(std), x, dim, keepdim, None)
    rows = _flat_rows(x, plan)
    divisor = max(rows.shape[-1] - correction, 0)

    def tile_moments(tile: torch.Tensor) -> torch.Tensor:
        values = tile.float()
        mean = values.mean(-1, keepdim=True)
        var = (values - mean).square().sum(-1, keepdim=True) / divisor
        return torch.cat([var.sqrt() if std else var, mean], -1)

    moments = library.map_row_tiles(tile_moments, rows).to(plan.out_dtype)
    # Two fresh contiguous tensors: outputs of an op may not alias each other.
    return tuple(moments[:, i].clone(memory_format=torch.contiguous_format).reshape(plan.out_shape) for i in (0, 1))


def _moments_triton(std: bool, x, dim, correction=1.0, keepdim=False):
    plan = _plan(_moments_name(std), x, dim, keepdim, None)
    from bi_compile.kernels.rms_norm import var_mean

    stat, mean = var_mean(_as_rows(x, plan), correction, plan.out_dtype, std=std)
    return stat.reshape(plan.out_shape), mean.reshape(plan.out_shape)


for _std in (False, True):
    library.define_op(f"{_moments_name(_std).removeprefix('bi::')}"
                      "(Tensor self, int[]? dim, float correction=1, bool keepdim=False) -> (Tensor, Tensor)",
                      fake=functools.partial(_moments_fake, _std), cpu=functools.partial(_moments_cpu, _std),
                      triton=functools.partial(_moments_triton, _std))


def _logsumexp_fake(x, dim, keepdim=False):
    plan = _plan("bi::logsumexp", x, dim, keepdim, None)
    return x.new_empty(plan.out_shape)


def _logsumexp_cpu(x, dim, keepdim=False):
    """CPU path: torch's math (the max, taken as 0 where infinite, then log of the sum of exps) on fixed [tile, R]
    blocks (library.map_row_tiles)."""
    plan = _plan("bi::logsumexp", x, dim, keepdim, None)

    def tile_logsumexp(tile: torch.Tensor) -> torch.Tensor:
        values = tile.float()
        shift = values.amax(-1, keepdim=True) if values.shape[-1] else values.new_zeros(values.shape[:-1] + (1,))
        shift = shift.masked_fill(shift.isinf(), 0.0)
        return ((values - shift).exp().sum(-1, keepdim=True).log() + shift).squeeze(-1)

    return library.map_row_tiles(tile_logsumexp, _flat_rows(x, plan)).to(plan.out_dtype).reshape(plan.out_shape)


def _logsumexp_triton(x, dim, keepdim=False):
    plan = _plan("bi::logsumexp", x, dim, keepdim, None)
    rows = _as_rows(x, plan)
    if rows.shape[-1] == 0:  # the log of an empty sum
        return torch.full(plan.out_shape, float("-inf"), dtype=plan.out_dtype, device=x.device)
    from bi_compile.kernels.softmax import logsumexp

    return logsumexp(rows, plan.out_dtype).reshape(plan.out_shape)


library.define_op("logsumexp(Tensor self, int[] dim, bool keepdim=False) -> Tensor",
                  fake=_logsumexp_fake, cpu=_logsumexp_cpu, triton=_logsumexp_triton)
