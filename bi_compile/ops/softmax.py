"""``bi::softmax`` and ``bi::log_softmax``: aten ``_softmax`` / ``_log_softmax`` with a fixed reduction order.

    softmax(self, dim, half_to_float) -> exp(x - max) / sum(exp(x - max)) along ``dim``
    log_softmax(self, dim, half_to_float) -> (x - max) - log(sum(exp(x - max)))

Math in fp32; the output has the input's dtype, or fp32 when ``half_to_float`` (fp16/bf16 input only: aten
refuses it for fp32). Unlike aten's CPU kernel, half_to_float also works on CPU.

The kernels reduce the last dim. For another ``dim`` the op moves it last: that costs a copy of the input
(the kernel needs the reduced dim unit-stride) and one of the output (back to a contiguous layout in the
original dim order), i.e. about 2x the traffic of a last-dim softmax. No model in scope does that.
"""

from __future__ import annotations

import functools
import math
import torch

from bi_compile.ops import library
from bi_compile.ops.library import Layout

# Any strides: the op itself makes the softmax dim last and unit-stride (a copy only when it is not already),
# so the graph pass never has to insert one.
library.layout_contract("bi::softmax", self=Layout.ANY)
library.layout_contract("bi::log_softmax", self=Layout.ANY)


@library.memoized_on_metadata
def _plan(op: str, x: torch.Tensor, dim: int, half_to_float: bool) -> tuple[int, torch.dtype]:
    """Validate; return the wrapped dim and the output dtype."""
    library.check_dtype(op, self=x)
    span = max(x.dim(), 1)  # a 0-dim tensor takes dim 0 or -1, as in aten
    if not -span <= dim < span:
        raise library.reject(op, f"dim {dim} out of range for a rank-{x.dim()} tensor", self=x)
    if half_to_float and x.dtype == torch.float32:
        raise library.reject(op, "half_to_float needs a float16 or bfloat16 input", self=x)
    return dim % span, torch.float32 if half_to_float else x.dtype


def _qualname(log: bool) -> str:
    return "bi::log_softmax" if log else "bi::softmax"


def _fake(log: bool, x: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=_plan(_qualname(log), x, dim, half_to_float)[1])


def _tile_softmax(tile: torch.Tensor, log: bool) -> torch.Tensor:
    """The kernel's math in torch, fp32: (x - max) - log(S) or exp(x - max) / S, S = sum exp(x - max)."""
    x = tile.float()
    shifted = x - x.amax(-1, keepdim=True)
    exp = shifted.exp()
    total = exp.sum(-1, keepdim=True)
    return shifted - total.log() if log else exp / total


def _cpu(log: bool, x: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
    """CPU path: the kernel's math on fixed [tile, N] blocks (library.map_row_tiles)."""
    dim, out_dtype = _plan(_qualname(log), x, dim, half_to_float)
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=out_dtype)

    def last_dim(moved: torch.Tensor) -> torch.Tensor:
        rows = moved.reshape(math.prod(moved.shape[:-1]), moved.shape[-1])
        return library.map_row_tiles(lambda tile: _tile_softmax(tile, log), rows).to(out_dtype).reshape(moved.shape)

    return library.along_dim(x, dim, last_dim)


def _triton(log: bool, x: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
    dim, out_dtype = _plan(_qualname(log), x, dim, half_to_float)
    from bi_compile.kernels.softmax import softmax as launch

    return library.along_dim(x, dim, lambda moved: launch(moved, out_dtype, log=log))


for _log in (False, True):
    library.define_op(f"{_qualname(_log).removeprefix('bi::')}(Tensor self, int dim, bool half_to_float) -> Tensor",
                      fake=functools.partial(_fake, _log), cpu=functools.partial(_cpu, _log),
                      triton=functools.partial(_triton, _log))
