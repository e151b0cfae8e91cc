"""Pass 1 — unfuse add+rmsnorm: a fused residual-add + RMSNorm becomes an add followed by ``bi.rms_norm``.

Fused add+rmsnorm kernels (aclnnAddRmsNorm behind torch_npu's ``npu_add_rms_norm``, vLLM's ``fused_add_rms_norm``)
reduce in an order that depends on the batch. Unfused, the add is pointwise (invariant) and the norm is ours.
Every output the graph uses keeps a producer: the normalized y, the fp32 rstd where the op returns one, and the sum
that becomes the next layer's residual. The sum is rounded to the input dtype before the norm, exactly as an unfused
``x + residual`` is; a fused kernel that normalizes the unrounded fp32 sum may differ from it in the last bit.

    before:  %f = npu.npu_add_rms_norm(%x, %res, %g, 1e-6);  %y = getitem(%f, 0);  %s = getitem(%f, 2)
    after:   %s = aten.add(%x, %res);  %n = bi.rms_norm(%s, %g, 1e-6);  %y = getitem(%n, 0)

It runs before ``replace`` so that the graph has one shape of rmsnorm left to reason about.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch.fx import Graph

from .fx_utils import getitem, insert_call, op_call, outputs_covered, rewire


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
        total = insert_call(graph, torch.ops.aten.add.Tensor, (args[fused.x], args[fused.residual]), origin=node)
        norm = insert_call(graph, torch.ops.bi.rms_norm.default,
                           (total, args[fused.weight], float(args[fused.eps])), origin=node)
        made = {"sum": total,
                "y": getitem(graph, norm, 0, origin=node),
                "rstd": getitem(graph, norm, 1, origin=node)}
        rewire(call, {key: made[what] for key, what in fused.outputs.items()})
        rewrites[f"{fused.source} -> aten.add + bi.rms_norm"] += 1
    return rewrites
