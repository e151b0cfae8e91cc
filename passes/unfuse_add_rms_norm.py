"""Pass 1 — unfuse add+rmsnorm: a vendor's fused residual-add + RMSNorm becomes ``bi.add_rms_norm``, or an add
followed by ``bi.rms_norm``.

Fused add+rmsnorm kernels (aclnnAddRmsNorm behind torch_npu's ``npu_add_rms_norm``, vLLM's ``fused_add_rms_norm``)
reduce in an order that depends on the batch, and some normalize the unrounded fp32 sum. Taken apart, the add is
pointwise (invariant) and the norm is ours. ``bi.add_rms_norm`` is that unfused pair in one launch: it rounds the
sum to the input dtype, stores it, and normalizes the rounded sum with ``bi.rms_norm``'s blocking, so its three
outputs equal ``x + residual`` and ``bi.rms_norm`` of it bit for bit (tests/test_ops_norm.py). It serves where both
addends have one dtype and one shape; otherwise (a broadcast residual, an fp32 residual beside a half input, whose
add promotes) the pass writes the add and the norm as two nodes. Every output the graph uses keeps a producer: the
normalized y, the fp32 rstd where the op returns one, and the sum that becomes the next layer's residual.

    before:  %f = npu.npu_add_rms_norm(%x, %res, %g, 1e-6);  %y = getitem(%f, 0);  %s = getitem(%f, 2)
    after:   %n = bi.add_rms_norm(%x, %res, %g, 1e-6);  %y = getitem(%n, 0);  %s = getitem(%n, 2)

It runs before ``replace`` so that the graph has one shape of rmsnorm left to reason about.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .fx_utils import fake_value, getitem, insert_call, op_call, outputs_covered, rewire


@dataclass(frozen=True)
class FusedAddRmsNorm:
    source: str  # the fused op, e.g. "npu.npu_add_rms_norm.default"
    x: str  # argument names of the two addends, the weight and epsilon
    residual: str
    weight: str
    eps: str
    outputs: dict  # source output (int index, or name of a mutated argument) -> "y" | "rstd" | "sum"


FUSED_ADD_RMS_NORMS = (
    FusedAddRmsNorm("npu.npu_add_rms_norm.default", "x1", "x2", "gamma", "epsilon", {0: "y", 1: "rstd", 2: "sum"}),
    FusedAddRmsNorm("vllm_ir.fused_add_rms_norm.default", "x", "x_residual", "weight", "epsilon", {0: "y", 1: "sum"}),
    FusedAddRmsNorm("_C.fused_add_rms_norm.default", "input", "residual", "weight", "epsilon",
                    {"input": "y", "residual": "sum"}),
)
BY_SOURCE = {f.source: f for f in FUSED_ADD_RMS_NORMS}


def same_dtype_and_shape(x: Node, residual: Node) -> bool:
    """Whether ``x + residual`` neither broadcasts nor promotes: then bi.add_rms_norm's sum is aten.add's."""
    a, b = fake_value(x), fake_value(residual)
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
            and a.dim() == b.dim() and all(statically_known_true(m == n) for m, n in zip(a.shape, b.shape)))


def unfuse_add_rms_norm_pass(graph: Graph) -> Counter:
    rewrites: Counter = Counter()
    for node in list(graph.nodes):
        call = op_call(node)
        fused = BY_SOURCE.get(call.name) if call else None
        if fused is None or not outputs_covered(call, fused.outputs):
            continue
        if call.arguments.get("variance_size") is not None:
            continue  # a partial-width variance: not ours to express; the audit reports the node
        args = call.arguments
        x, residual, weight, eps = args[fused.x], args[fused.residual], args[fused.weight], float(args[fused.eps])
        if same_dtype_and_shape(x, residual):
            norm = insert_call(graph, torch.ops.bi.add_rms_norm.default, (x, residual, weight, eps), origin=node)
            total, done = getitem(graph, norm, 2, origin=node), "bi.add_rms_norm"
        else:
            total = insert_call(graph, torch.ops.aten.add.Tensor, (x, residual), origin=node)
            norm = insert_call(graph, torch.ops.bi.rms_norm.default, (total, weight, eps), origin=node)
            done = "aten.add + bi.rms_norm"
        made = {"sum": total, "y": getitem(graph, norm, 0, origin=node), "rstd": getitem(graph, norm, 1, origin=node)}
        rewire(call, {key: made[what] for key, what in fused.outputs.items()})
        rewrites[f"{fused.source} -> {done}"] += 1
    return rewrites
