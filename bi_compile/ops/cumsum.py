"""``bi::cumsum``: aten ``cumsum`` of floating tensors with a fixed order of additions.

    cumsum(self, dim, dtype=None) -> y, y[..., j, ...] = sum of self[..., :j + 1, ...] along ``dim``

As in aten each element is cast to ``dtype`` (the output dtype, default: the input's) first; the running sums are
fp32. Integer cumsums are exact (MoE routing offsets), so the graph pass leaves them to aten. The kernel scans the
last dim; another ``dim`` is moved last (``library.along_dim``: a copy of the input and of the output).
"""

from __future__ import annotations

import math

import torch

from bi_compile.ops import library
from bi_compile.ops.library import Layout

# Any strides: the op itself makes the scanned dim last and unit-stride (a copy only when it is not already).
library.layout_contract("bi::cumsum", self=Layout.ANY)


@library.memoized_on_metadata
def _plan(x: torch.Tensor, dim: int, dtype: torch.dtype | None) -> tuple[int, torch.dtype]:
    """Validate; return the wrapped dim and the output dtype."""
    op = "bi::cumsum"
    library.check_dtype(op, self=x)
    out_dtype = library.out_dtype(op, x, dtype)
    span = max(x.dim(), 1)  # a 0-dim tensor takes dim 0 or -1, as in aten
    if not -span <= dim < span:
        raise library.reject(op, f"dim {dim} out of range for a rank-{x.dim()} tensor", self=x)
    return dim % span, out_dtype


def _fake(x, dim, dtype=None):
    return x.new_empty(x.shape, dtype=_plan(x, dim, dtype)[1])


def _cpu(x, dim, dtype=None):
    """CPU path: fp32 cumsums of fixed [tile, N] blocks (library.map_row_tiles)."""
    dim, out_dtype = _plan(x, dim, dtype)

    def last_dim(moved: torch.Tensor) -> torch.Tensor:
        rows = moved.reshape(math.prod(moved.shape[:-1]), moved.shape[-1])
        scanned = library.map_row_tiles(lambda tile: tile.to(out_dtype).float().cumsum(-1), rows)
        return scanned.to(out_dtype).reshape(moved.shape)

    return library.along_dim(x, dim, last_dim)


def _triton(x, dim, dtype=None):
    dim, out_dtype = _plan(x, dim, dtype)
    from bi_compile.kernels.cumsum import cumsum as launch

    return library.along_dim(x, dim, lambda moved: launch(moved, out_dtype))


library.define_op("cumsum(Tensor self, int dim, *, ScalarType? dtype=None) -> Tensor", fake=_fake, cpu=_cpu,
                  triton=_triton)
