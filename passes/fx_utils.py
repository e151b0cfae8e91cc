"""FX helpers the passes share: a node's op and arguments by schema name, and node insertion that keeps
``node.meta['val']`` right (the fake value is recomputed by running the new op under the graph's fake mode)."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized, auto_functionalized_v2
from torch._guards import detect_fake_mode
from torch.fx import Graph, Node
from torch.utils._pytree import tree_leaves, tree_map

FUNCTIONALIZED = (auto_functionalized, auto_functionalized_v2)


@dataclass
class OpCall:
    """One op application in a graph: ``node`` calls ``op`` directly, or through auto_functionalized(_v2)
    when ``op`` mutates its arguments (vLLM's ``_C`` ops appear that way in captured graphs)."""

    node: Node
    op: torch._ops.OpOverload
    arguments: dict[str, Any]  # every schema argument by name, defaults filled in
    functionalized: bool

    @property
    def name(self) -> str:  # "aten.mm.default"
        return str(self.op)

    def mutated_output_index(self, arg_name: str) -> int | None:
        """Index of the getitem that yields the new value of mutated argument ``arg_name``."""
        if self.node.target is auto_functionalized:
            mutable = [a.name for a in self.op._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
            return 1 + mutable.index(arg_name) if arg_name in mutable else None
        # v2 returns (op result, *new values of _all_bases); a view of a base would need re-viewing: not handled.
        if any(k.startswith(f"_{arg_name}_") and k != f"_{arg_name}_base_index" for k in self.node.kwargs):
            return None
        base = self.node.kwargs.get(f"_{arg_name}_base_index")
        return None if base is None else 1 + base


def op_call(node: Node) -> OpCall | None:
    if node.op != "call_function":
        return None
    functionalized = node.target in FUNCTIONALIZED
    op = node.args[0] if functionalized else node.target
    if not isinstance(op, torch._ops.OpOverload):
        return None
    arguments = {}
    positional = node.args[1:] if functionalized else node.args
    for i, arg in enumerate(op._schema.arguments):
        if functionalized and node.target is auto_functionalized_v2 and arg.alias_info is not None:
            arguments[arg.name] = _v2_base(node, arg.name)
        elif i < len(positional) and not arg.kwarg_only:
            arguments[arg.name] = positional[i]
        elif arg.name in node.kwargs:
            arguments[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            arguments[arg.name] = arg.default_value
        else:
            arguments[arg.name] = None
    return OpCall(node, op, arguments, functionalized)


def _v2_base(node: Node, arg_name: str):
    base = node.kwargs.get(f"_{arg_name}_base_index")
    return None if base is None else node.kwargs["_all_bases"][base]


def fake_value(arg):
    return arg.meta.get("val") if isinstance(arg, Node) else arg


# What a node inserted in another's place inherits from it: where in the user's code it comes from.
SOURCE_META = ("stack_trace", "nn_module_stack", "source_fn_stack")


def insert_call(graph: Graph, target, args: tuple = (), kwargs: dict | None = None, *, origin: Node) -> Node:
    """Insert ``target(*args, **kwargs)`` before ``origin``, inheriting its source location, with a correct meta['val']."""
    kwargs = kwargs or {}
    with graph.inserting_before(origin):
        node = graph.call_function(target, tuple(args), kwargs)
    for key in SOURCE_META:
        if key in origin.meta:
            node.meta[key] = origin.meta[key]
    inputs = [a for a in tree_leaves((args, kwargs)) if isinstance(a, Node)]
    if inputs and all("val" in a.meta for a in inputs):
        fake_args, fake_kwargs = tree_map(fake_value, (args, kwargs))
        fake_mode = detect_fake_mode([a.meta["val"] for a in inputs])
        if fake_mode is not None:
            with fake_mode:
                node.meta["val"] = target(*fake_args, **fake_kwargs)
    return node


def getitem(graph: Graph, node: Node, index: int, *, origin: Node) -> Node:
    return insert_call(graph, operator.getitem, (node, index), origin=origin)


def getitem_users(node: Node) -> dict[int, list[Node]] | None:
    """The getitem users of a tuple-valued node by index; None if something else uses the tuple whole."""
    users: dict[int, list[Node]] = {}
    for user in node.users:
        if user.op != "call_function" or user.target is not operator.getitem:
            return None
        users.setdefault(user.args[1], []).append(user)
    return users


TORCH_DIR = str(Path(torch.__file__).parent)


def source_line(node: Node) -> str:
    """``file:line  code`` of the innermost user frame that produced ``node`` (from meta['stack_trace']). Frames in
    torch's own files (a functional collective's wrapper, which Dynamo traces through) are passed over for the
    caller's, where there is one."""
    trace = node.meta.get("stack_trace") or ""
    lines = [line.strip() for line in trace.strip().splitlines()]
    frames = []
    for i, line in enumerate(lines):
        if line.startswith('File "'):
            location = line.split(", in ")[0].replace('File "', "").replace('", line ', ":")
            code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith('File "') else ""
            frames.append(f"{location}  {code}".strip())
    outside_torch = [frame for frame in frames if not frame.startswith(TORCH_DIR)]
    return (outside_torch or frames or [""])[-1]


def outputs_covered(call: OpCall, keys) -> bool:
    """Whether every use of ``call``'s result goes through an output named in ``keys``:
    None = the whole result, an int = that tuple element, a str = the new value of that mutated argument."""
    keys = set(keys)
    if None in keys:
        return True
    users = getitem_users(call.node)
    if users is None:
        return False
    indices = {k for k in keys if isinstance(k, int)}
    indices |= {call.mutated_output_index(k) for k in keys if isinstance(k, str)}
    return set(users) <= indices


def rewire(call: OpCall, produced: dict) -> None:
    """Point every use of ``call``'s outputs at the nodes in ``produced`` (keys as in ``outputs_covered``), then drop it."""
    node = call.node
    if None in produced:
        node.replace_all_uses_with(produced[None])
    else:
        index_of = {k if isinstance(k, int) else call.mutated_output_index(k): v for k, v in produced.items()}
        for index, users in getitem_users(node).items():
            for user in users:
                user.replace_all_uses_with(index_of[index])
                node.graph.erase_node(user)
    node.graph.erase_node(node)
