"""A stand-in for torch_npu's aclgraph capture API (``torch.npu.NPUGraph`` and ``torch.npu.graph``) on CPU tensors.

    graph = NPUGraph()
    with graph_capture(graph):          # torch.npu.graph(graph)
        out = step(*static_inputs)
    ...write new values into static_inputs...
    graph.replay()                      # out now holds the step's result for them

Capture runs the step once and records every op that reaches the dispatcher (a ``bi`` op is one op, as an NPU
kernel launch would be), with the tensors it read and wrote. Replay runs exactly that sequence again on those same
tensors, writing each result into the memory the capture's result used. As in a real graph, nothing is traced
again and no Python of the step runs: a step that made a host decision from tensor data, allocated by data or
depended on a tensor created outside the recorded ops would replay stale results. What it does not stand in for:
NPU kernels, streams, and the capture restrictions of torch_npu and CANN.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map


class NPUGraph:
    def __init__(self):
        self.ops: list[tuple] = []  # (op, args, kwargs, the outputs as captured)

    def replay(self) -> None:
        for op, args, kwargs, captured in self.ops:
            results = op(*args, **kwargs)
            for into, result in zip(tree_flatten(captured)[0], tree_flatten(results)[0]):
                if isinstance(into, torch.Tensor) and into.data_ptr() != result.data_ptr():
                    into.copy_(result)


class _Recorder(TorchDispatchMode):
    @classmethod
    def ignore_compile_internals(cls) -> bool:
        """Off while torch.compile traces, on while its artifact runs: the recorder sees what a device would."""
        return True

    def __init__(self, graph: NPUGraph):
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, op, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        results = op(*args, **kwargs)
        # Views share their base's memory, which replay refreshes; a view's own result needs no copy.
        self.graph.ops.append((op, args, kwargs, tree_map(lambda t: t, results)))
        return results


@contextlib.contextmanager
def graph_capture(graph: NPUGraph):
    with _Recorder(graph):
        yield
