"""Pass 2 — written-out RMSNorm: a norm that a model writes out in torch ops becomes ``bi.rms_norm``, and with the
residual add before it, ``bi.add_rms_norm``.

transformers' RMSNorm (Llama, Qwen, Mistral and their kin) reaches the graph as seven ops, and its residual add as
an eighth::

    s = a + b;  h = s.float();  ms = h.pow(2).mean(-1, keepdim=True);  y = w * (h * rsqrt(ms + eps)).to(s.dtype)

``replace`` alone turns the mean into ``bi.mean_square`` and leaves the rest to Inductor: a layer then launches the
add, the mean of squares and the normalization apart, three launches where stock fuses one. Matched whole here, the
chain is one ``bi.add_rms_norm`` launch (``bi.rms_norm`` without the add), whose ``s`` output stands in for the sum
everywhere else it is read (the next residual). Each launch saved is host time on every step outside a CUDA graph
(docs/benchmarks.md, "Prefill outside CUDA graphs").

Only the exact chain is taken: a last-dim mean of fp32 squares of ``h``, each intermediate read by the chain alone,
``h`` a widening of a half tensor ``x`` (or ``x`` itself in fp32) and the weight, when there is one, a ``[N]`` tensor
whose product keeps ``x``'s dtype. ``y`` is then the norm within one rounding: transformers rounds ``h * rstd`` to the
input dtype before the weight, ``bi.rms_norm`` rounds ``h * rstd * w`` once (as aten.rms_norm's decomposition, the
form ``torch.nn.RMSNorm`` takes, does). vLLM's native norm sums its residual in fp32 from half addends: that sum
stays Inductor's (the widened copies are not written out for ``bi.add_rms_norm``), and the norm of it is
``bi.rms_norm``. Anything else (Gemma's ``1 + w``, an rstd the graph also reads) is left for ``replace``. The epsilon
is a literal, or, where torch.compile traced the module's float as an input, that 0-dim CPU tensor (the ops'
``eps_tensor`` overloads read it on the host).

    before:  %s = aten.add(%a, %b);  %h = convert(%s, f32);  ...  %y = aten.mul(%w, convert(%n, bf16))
    after:   %f = bi.add_rms_norm.eps_tensor(%a, %b, %w, %eps);  %y = getitem(%f, 0);  %s' = getitem(%f, 2)
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .fx_utils import fake_value, getitem, insert_call, op_call
from .replace import producer, widened_from
from .unfuse_add_rms_norm import same_dtype_and_shape

aten, prims = torch.ops.aten, torch.ops.prims
CONVERTS = (prims.convert_element_type.default, aten._to_copy.default)


def only_user(node: Node, *targets) -> Node | None:
    """The single user of ``node`` when it calls one of ``targets``."""
    users = list(node.users)
    return producer(users[0], *targets) if len(users) == 1 else None


def other_operand(mul: Node, operand: Node) -> Any:
    """The factor of a two-operand ``mul`` that is not ``operand``."""
    a, b = mul.args[:2]
    return b if a is operand else a


def last_dim_only(dims: Any, rank: int) -> bool:
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] in (-1, rank - 1)


def epsilon(add: Node, mean: Node) -> float | Node | None:
    """The epsilon that ``add`` adds to ``mean``: a number, or a 0-dim float tensor node (torch.compile's input for a
    traced float), read past its conversions to fp64 and fp32, which round it as the kernel's fp32 eps does; None
    for anything else."""
    eps = other_operand(add, mean)
    if isinstance(eps, (int, float)):
        return float(eps)
    source = eps
    while (convert := producer(source, *CONVERTS)) is not None and fake_value(convert).dtype in (torch.float32,
                                                                                                  torch.float64):
        source = convert.args[0]
    val = fake_value(source)
    if isinstance(val, torch.Tensor) and val.dim() == 0 and val.is_floating_point() and val.device.type == "cpu":
        return source
    return None


def match(mean: Node) -> tuple[Node, Node, Node | None, float | Node] | None:
    """``(x, y, weight, eps)`` of the RMSNorm whose mean of squares is ``mean``, ``y`` the node whose value the norm
    gives; None where the chain is not exactly the written-out norm."""
    arguments = op_call(mean).arguments
    square = producer(arguments["self"], aten.pow.Tensor_Scalar, aten.mul.Tensor)
    val = fake_value(mean)
    if (square is None or len(square.users) != 1 or not arguments["keepdim"] or arguments["dtype"] is not None
            or not isinstance(val, torch.Tensor) or val.dtype != torch.float32):
        return None
    h, exponent = square.args[:2]
    if not (exponent == 2 if square.target is aten.pow.Tensor_Scalar else exponent is h):
        return None
    if not last_dim_only(arguments["dim"], fake_value(h).dim()):
        return None
    add = only_user(mean, aten.add.Tensor, aten.add.Scalar)  # Scalar: aten.rms_norm's decomposition (nn.RMSNorm)
    rsqrt = only_user(add, aten.rsqrt.default) if add is not None and add.kwargs.get("alpha", 1) == 1 else None
    normed = only_user(rsqrt, aten.mul.Tensor) if rsqrt is not None else None
    eps = epsilon(add, mean) if add is not None else None
    if normed is None or eps is None or other_operand(normed, rsqrt) is not h:
        return None
    x = widened_from(h)
    if x is h:  # an fp32 input: the normalized rows, then the weight
        return with_weight(x, normed, eps)
    after = only_user(normed, aten.mul.Tensor, *CONVERTS)
    if after is None:
        return None
    if after.target is aten.mul.Tensor:  # aten.rms_norm's order: the weight in fp32, then one rounding
        weight, y = other_operand(after, normed), only_user(after, *CONVERTS)
        if not is_weight(weight, x) or y is None or fake_value(y).dtype != fake_value(x).dtype:
            return None
        return x, y, weight, eps
    if fake_value(after).dtype != fake_value(x).dtype:
        return None
    return with_weight(x, after, eps)  # transformers' order: rounded to the input dtype, then the weight


def is_weight(weight: Any, x: Node) -> bool:
    w = fake_value(weight)
    return (isinstance(w, torch.Tensor) and w.dim() == 1 and w.is_floating_point()
            and statically_known_true(w.shape[0] == fake_value(x).shape[-1]))


def with_weight(x: Node, y: Node, eps: float | Node) -> tuple[Node, Node, Node | None, float | Node]:
    """``y``, the normalized rows in x's dtype, times a weight where its only user is one that keeps that dtype."""
    weighted = only_user(y, aten.mul.Tensor)
    weight = other_operand(weighted, y) if weighted is not None else None
    if weighted is not None and is_weight(weight, x) and fake_value(weighted).dtype == fake_value(x).dtype:
        return x, weighted, weight, eps
    return x, y, None, eps


def residual_addends(x: Node, weight: Node | None, eps: float | Node,
                     order: dict[Node, int]) -> tuple[Node, Node] | None:
    """``(a, b)`` when ``x = a + b`` is a plain add of one dtype and shape whose norm can be launched where the sum
    is made (the weight and epsilon come before it in ``order``, the graph's)."""
    add = producer(x, aten.add.Tensor)
    if add is None or add.kwargs.get("alpha", 1) != 1 or not all(isinstance(a, Node) for a in add.args[:2]):
        return None
    a, b = add.args[:2]
    if widened_from(a) is not a or widened_from(b) is not b:
        return None  # a sum taken in fp32 of half addends (vLLM's): the widened copies would have to be written out
    inputs = [n for n in (weight, eps) if isinstance(n, Node)]
    if not same_dtype_and_shape(a, b) or any(order[n] > order[x] for n in inputs):
        return None
    return a, b


def written_rms_norm_pass(graph: Graph) -> Counter:
    rewrites: Counter = Counter()
    order = {node: i for i, node in enumerate(graph.nodes)}  # of the nodes a match reads: none is inserted later
    for mean in list(graph.nodes):
        found = match(mean) if producer(mean, aten.mean.dim) is not None else None
        if found is None:
            continue
        x, y, weight, eps = found
        overload = "eps_tensor" if isinstance(eps, Node) else "default"
        addends = residual_addends(x, weight, eps, order)
        if addends is not None:
            norm_op = getattr(torch.ops.bi.add_rms_norm, overload)
            norm = insert_call(graph, norm_op, (*addends, weight, eps), origin=x.next)
            x.replace_all_uses_with(getitem(graph, norm, 2, origin=norm.next))
            done = f"written-out add + rmsnorm -> bi.add_rms_norm.{overload}"
        else:
            norm = insert_call(graph, getattr(torch.ops.bi.rms_norm, overload), (x, weight, eps), origin=y)
            done = f"written-out rmsnorm -> bi.rms_norm.{overload}"
        y.replace_all_uses_with(getitem(graph, norm, 0, origin=y))
        rewrites[done] += 1
    graph.eliminate_dead_code()
    return rewrites
