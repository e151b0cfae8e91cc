"""Pass 4 — contiguous: copy an input to a ``bi`` op only where its strides break the op's layout contract.

Each bi op declares the strides it reads (``bi_compile.ops.library.LAYOUT_CONTRACTS``). A Triton kernel handed
strides it does not expect reads the wrong elements — on Ascend that surfaced as the aclgraph "ub overflow" from
transposed matmul inputs. The pass reads each argument's fake value and inserts
``aten.clone(x, memory_format=torch.contiguous_format)`` for exactly the arguments that break the contract. Weights never need it: ``replace`` already routed a transposed weight to ``bi.linear``,
which reads [N, K] in place. A copy of a graph input (a parameter on every step) is still made if a contract
demands it, and recorded separately so the report shows it.

    before:  %t = aten.permute(%x, [1, 0]);  %y = bi.softmax(%t, -1, False)      # t has stride (1, s0)
    after:   %c = aten.clone(%t, memory_format=torch.contiguous_format);  %y = bi.softmax(%c, -1, False)
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.fx import Graph, Node

from bi_compile.ops.library import LAYOUT_CONTRACTS

from .fx_utils import fake_value, insert_call


def contract_of(node: Node) -> dict | None:
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    return LAYOUT_CONTRACTS.get(node.target._schema.name)


def contiguous_pass(graph: Graph) -> tuple[Counter, list[str]]:
    """Returns (copies per op, the names of graph inputs that had to be copied)."""
    copies: Counter = Counter()
    copied_inputs: list[str] = []
    for node in list(graph.nodes):
        contract = contract_of(node)
        if not contract:
            continue
        for index, arg in enumerate(node.target._schema.arguments):
            layout = contract.get(arg.name)
            value = node.args[index] if index < len(node.args) else node.kwargs.get(arg.name)
            val = fake_value(value)
            if layout is None or not isinstance(value, Node) or not isinstance(val, torch.Tensor) or layout.accepts(val):
                continue
            copy = insert_call(graph, torch.ops.aten.clone.default, (value,),
                               {"memory_format": torch.contiguous_format}, origin=node)
            node.replace_input_with(value, copy)
            copies[f"{node.target._schema.name}:{arg.name}"] += 1
            if value.op == "placeholder":
                copied_inputs.append(value.name)
    return copies, copied_inputs
