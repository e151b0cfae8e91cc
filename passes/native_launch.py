"""Pass 6 — native_launch: a bi op's kernel launch handed to Inductor, to emit in its generated code.

A bi op called from Inductor's generated code costs, on every call, a custom-op dispatch, the op's Python and
Triton's Python launcher (about 20 µs a call on the H100 host, where Inductor launches its own kernels in a few:
docs/benchmarks.md, "Prefill outside CUDA graphs"). Each ops file may register, next to an op, the launch of its
kernel as a traceable function (``bi_compile.ops.library.NATIVE_LAUNCHES``). Where it accepts the call (a layout
and arguments its launch takes), this pass traces it over the node's fake values and puts the result in the node's
place: ``empty`` outputs and one ``triton_kernel_wrapper_functional``, what torch.compile records for a user's
``wrap_triton`` launch, which Inductor then reinplaces, lowers and launches like one of its own kernels.

    before:  %r = bi.rms_norm.default(%x, %w, 1e-06);  %y = getitem(%r, 0)
    after:   %y0 = aten.empty(...);  %s0 = aten.empty(...)
             %k = triton_kernel_wrapper_functional(kernel_idx=.., grid=[(cdiv(s0, 16), 1, 1)], kwargs={..},
                                                   tensors_to_clone=['y_ptr', 'stat_ptr'])
             %y = getitem(%k, 'y_ptr')

The launch is the op's own: the same kernel, blocking, constexprs and ints (from metadata only, never the trace's
batch), so the same bits. It runs last, after the audit has classified the bi ops, and only where asked (the
backend's ``native_launch`` option, with Inductor as the inner compiler: the eager one keeps the op calls, whose
launches are cheaper outside Inductor).
"""

from __future__ import annotations

import contextlib
import itertools
from collections import Counter

import torch
from torch._guards import detect_fake_mode
from torch._inductor.decomposition import select_decomp_table
from torch.fx import Graph, GraphModule, Node
from torch.fx.experimental.proxy_tensor import make_fx

from bi_compile.ops.library import NATIVE_LAUNCHES

from .fx_utils import SOURCE_META, fake_value, getitem_users, op_call


def native_launch_pass(graph: Graph) -> Counter:
    """Returns the launches handed to Inductor, per op."""
    launched: Counter = Counter()
    symbol_nodes = _SymbolNodes(graph)
    for node in list(graph.nodes):
        call = op_call(node)
        if call is None or call.functionalized or call.op._schema.name not in NATIVE_LAUNCHES:
            continue
        single = len(call.op._schema.returns) == 1
        users = None if single else getitem_users(node)
        launch = NATIVE_LAUNCHES[call.op._schema.name]({name: fake_value(v) for name, v in call.arguments.items()})
        if launch is None or (users is None and not single):
            continue
        inputs = [call.arguments[name] for name in launch.inputs]
        fakes = [fake_value(arg) for arg in inputs]
        symbols = [symbol_nodes.get(symbol) for symbol in _size_symbols(fakes)]
        symbols = [node for node in symbols if node is not None]
        # Decomposed as Inductor's post-grad graphs are (its pattern matcher traces replacements the same way): an
        # op it decomposes, such as aten.transpose.int, has no lowering of its own there.
        with detect_fake_mode(fakes) or contextlib.nullcontext():
            traced = make_fx(_with_cond_symbols(launch.trace, len(fakes)),
                             decomposition_table=select_decomp_table())(*fakes, *(n.meta["val"] for n in symbols))
        _adopt_subgraphs(traced, graph.owning_module)
        copied = dict(zip(_placeholders(traced.graph), inputs + symbols))
        with graph.inserting_before(node):
            outputs = graph.graph_copy(traced.graph, copied)
        for new in copied.values():  # the launch keeps the op call's source line, for reports and profiles
            if isinstance(new, Node) and new not in inputs:
                new.meta.update({key: node.meta[key] for key in SOURCE_META if key in node.meta})
        if single:
            node.replace_all_uses_with(outputs)
        else:
            for index, getitems in users.items():
                for user in getitems:
                    user.replace_all_uses_with(outputs[index])
                    graph.erase_node(user)
        graph.erase_node(node)
        launched[call.name] += 1
    symbol_nodes.erase_unused()
    return launched


def _size_symbols(fakes: list) -> list:
    """The size symbols in the sizes and strides of ``fakes`` (fake tensors), by name."""
    symbols = {symbol for fake in fakes if isinstance(fake, torch.Tensor) for size in (*fake.shape, *fake.stride())
               if isinstance(size, torch.SymInt) for symbol in size.node.expr.free_symbols}
    return sorted(symbols, key=str)


class _SymbolNodes:
    """A node of ``graph`` for each of its bare size symbols, for the launches' ``cond`` branches, which Inductor
    binds symbols for from their inputs alone (``kernels.launch.launch_cond``): a ``Sym`` placeholder, or else a
    ``sym_size`` of the first input that has the symbol as a dimension, inserted when first asked for."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.placeholders = _placeholders(graph)
        self.nodes = {ph.meta["val"].node.expr: ph for ph in self.placeholders
                      if isinstance(ph.meta.get("val"), torch.SymInt)}
        self.inserted: list[Node] = []

    def get(self, symbol) -> Node | None:
        if symbol not in self.nodes:
            dims = ((ph, dim) for ph in self.placeholders if isinstance(ph.meta.get("val"), torch.Tensor)
                    for dim, size in enumerate(ph.meta["val"].shape)
                    if isinstance(size, torch.SymInt) and size.node.expr == symbol)
            for ph, dim in itertools.islice(dims, 1):
                with self.graph.inserting_after(self.placeholders[-1]):
                    node = self.graph.call_function(torch.ops.aten.sym_size.int, (ph, dim))
                node.meta["val"] = ph.meta["val"].shape[dim]
                self.nodes[symbol] = node
                self.inserted.append(node)
        return self.nodes.get(symbol)

    def erase_unused(self) -> None:
        for node in self.inserted:
            if not node.users:
                self.graph.erase_node(node)


def _with_cond_symbols(trace, num_tensors: int):
    """``trace`` over the first ``num_tensors`` arguments, the rest being the size symbols its ``cond``s pass on."""
    from bi_compile.kernels.launch import cond_symbols  # Triton, an extra, only where a launch is traced

    def traced(*args):
        with cond_symbols(args[num_tensors:]):
            return trace(*args[:num_tensors])
    return traced


def _placeholders(graph: Graph) -> list[Node]:
    return [node for node in graph.nodes if node.op == "placeholder"]


def _adopt_subgraphs(traced: GraphModule, owner: GraphModule) -> None:
    """Move the branch graphs of the traced launch's ``cond`` operators into the graph's module, under fresh names."""
    for node in traced.graph.nodes:
        if node.op == "get_attr":
            name = next(f"bi_launch_{i}" for i in itertools.count() if not hasattr(owner, f"bi_launch_{i}"))
            owner.register_module(name, getattr(traced, node.target))
            node.target = name
