"""The dispatcher-override baseline: batch invariance by routing ATen ops to the bi ops at the CUDA dispatch key.

This is the approach of Thinking Machines' batch_invariant_ops and of vLLM's VLLM_BATCH_INVARIANT mode: while the
context manager is active, these ATen ops run the ``torch.ops.bi`` kernels on CUDA tensors:

    mm, mm.out, addmm, addmm.out, bmm, bmm.out      -> bi.mm / bi.addmm / bi.bmm (.out: computed, then copied)
    _softmax, _log_softmax                          -> bi.softmax / bi.log_softmax
    mean.dim, sum.dim_IntList                       -> bi.mean / bi.sum (integer and bool sums stay on aten: exact)
    scaled_dot_product_attention                    -> bi.attention

``F.linear`` and ``torch.matmul`` are composite: on CUDA they reach mm/addmm/bmm, so they are covered. The .out
forms matter because compiled code calls ``extern_kernels.mm(..., out=buf)``; still, this baseline is meant for
eager code and for CUDA graphs captured from eager code (vLLM 0.32's fallback shape), not for torch.compile, whose
decompositions and generated kernels (fused reductions) never reach these dispatch entries.

Only the CUDA key is overridden: the bi ops' Triton paths call no overridden ATen op (they allocate and launch),
whereas their CPU paths are built on torch.mm / sum, so a CPU override would recurse into itself. A re-entered
override raises instead of recursing. Inputs that break a bi op's layout contract get a contiguous copy (what the
graph pass inserts in compiled code).

    with batch_invariant_override():
        logits = model(input_ids).logits
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings

import torch

import bi_compile.ops  # noqa: F401  (registers torch.ops.bi.*)
from bi_compile.ops.library import LAYOUT_CONTRACTS, Layout

aten, bi = torch.ops.aten, torch.ops.bi
DISPATCH_KEY = "CUDA"
_inside = threading.local()


def _exclusive(name: str, kernel):
    """Refuse re-entry: a bi kernel that calls an overridden ATen op would otherwise recurse forever."""

    @functools.wraps(kernel)
    def run(*args, **kwargs):
        if getattr(_inside, "op", None) is not None:
            raise RuntimeError(f"override of aten::{name} entered from inside the override of aten::{_inside.op}: "
                               "a bi kernel calls an overridden ATen op")
        _inside.op = name
        try:
            return kernel(*args, **kwargs)
        finally:
            _inside.op = None

    return run


def _conform(qualname: str, **tensors: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    """The tensors, each made contiguous where it breaks the bi op's declared layout contract."""
    contract = LAYOUT_CONTRACTS.get(qualname, {})
    return {name: t if t is None or contract.get(name, Layout.ANY).accepts(t) else t.contiguous()
            for name, t in tensors.items()}


def _into(out: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """The .out convention: resize ``out`` if its shape differs, copy the result in, return it."""
    if out.shape != result.shape:
        out.resize_(result.shape)
    return out.copy_(result)


def mm(self, mat2):
    return bi.mm(**_conform("bi::mm", self=self, mat2=mat2))


def mm_out(self, mat2, *, out):
    return _into(out, mm(self, mat2))


def addmm(self, mat1, mat2, *, beta=1, alpha=1):
    return bi.addmm(**_conform("bi::addmm", self=self, mat1=mat1, mat2=mat2), beta=float(beta), alpha=float(alpha))


def addmm_out(self, mat1, mat2, *, beta=1, alpha=1, out):
    return _into(out, addmm(self, mat1, mat2, beta=beta, alpha=alpha))


def bmm(self, mat2):
    return bi.bmm(**_conform("bi::bmm", self=self, mat2=mat2))


def bmm_out(self, mat2, *, out):
    return _into(out, bmm(self, mat2))


def softmax(self, dim, half_to_float):
    return bi.softmax(self, dim, half_to_float)


def log_softmax(self, dim, half_to_float):
    return bi.log_softmax(self, dim, half_to_float)


def mean_dim(self, dim, keepdim=False, *, dtype=None):
    return bi.mean(self, dim, keepdim, dtype)


def sum_dim(self, dim, keepdim=False, *, dtype=None):
    exact = not self.is_floating_point() and not self.is_complex() and (dtype is None or not dtype.is_floating_point)
    if exact:  # integer/bool sums do not depend on the order; the .out overload is not overridden
        result_dtype = dtype or torch.int64
        return aten.sum.IntList_out(self, dim, keepdim, dtype=dtype, out=self.new_empty(0, dtype=result_dtype))
    return bi.sum(self, dim, keepdim, dtype)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None,
                                 enable_gqa=False):
    tensors = _conform("bi::attention", query=query, key=key, value=value, attn_mask=attn_mask)
    return bi.attention(**tensors, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


OVERRIDES = {
    "mm": mm, "mm.out": mm_out, "addmm": addmm, "addmm.out": addmm_out, "bmm": bmm, "bmm.out": bmm_out,
    "_softmax": softmax, "_log_softmax": log_softmax, "mean.dim": mean_dim, "sum.dim_IntList": sum_dim,
    "scaled_dot_product_attention": scaled_dot_product_attention,
}


@contextlib.contextmanager
def batch_invariant_override():
    """Route the ops of ``OVERRIDES`` to the bi ops on CUDA tensors for the duration of the block."""
    library = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():  # "Overriding a previously registered kernel": that is the point
            warnings.filterwarnings("ignore", message=".*previously registered kernel.*")
            for name, kernel in OVERRIDES.items():
                library.impl(name, _exclusive(name, kernel), DISPATCH_KEY)
        yield
    finally:
        library._destroy()  # the stock CUDA kernels are back
