"""The batch-invariance pipeline: the one place that owns the pass order.

Over an ATen-level, functionalized FX graph (Inductor's post-grad graph, aot_autograd's forward graph, vLLM's
piecewise graphs), in this order:

1. ``unfuse_add_rms_norm`` — vendors' fused residual-add + RMSNorm ops become ``bi.add_rms_norm`` (``aten.add`` +
   ``bi.rms_norm`` where the add broadcasts or promotes);
2. ``written_rms_norm`` — an RMSNorm written out in torch ops (transformers'), with the residual add before it,
   becomes one ``bi.rms_norm`` / ``bi.add_rms_norm`` launch;
3. ``replace`` — every op of the replacement table becomes its ``bi`` op (then dead code is dropped);
4. ``contiguous`` — ``.contiguous()`` in front of exactly the bi-op inputs that break a layout contract;
5. ``audit`` — every remaining node is classified invariant / variant / unknown, with its source line;
6. ``native_launch`` (when asked; Inductor only) — the bi ops whose launch Inductor can emit itself become that launch.

Each pass logs one debug line with its count (rewrites, copies or findings) on the ``bi_compile.passes.pipeline``
logger; with ``BI_COMPILE_DEBUG_DIR`` set, the graph is written there before and after each pass.

The order matters: unfusing first leaves one form of rmsnorm, and a written-out norm is matched whole before
``replace`` takes its mean apart; layouts are checked only once all bi ops exist; the audit sees every bi op, before
some become Inductor's launches. ``BatchInvariantPass`` is an Inductor ``CustomGraphPass`` whose ``uuid()`` hashes
the source of the passes, the op contracts and the kernels, so Inductor's and vLLM's compile caches change when
they do.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx import Graph

from .audit import audit_pass
from .contiguous import contiguous_pass
from .native_launch import native_launch_pass
from .replace import decompositions_keeping_rewritten_ops, replace_pass
from .report import Report, record_report
from .cache_hash import source_hash
from .unfuse_add_rms_norm import unfuse_add_rms_norm_pass
from .written_rms_norm import written_rms_norm_pass


logger = logging.getLogger(__name__)
# A folder to write the graph to before and after each pass (Inductor's debug-dump habit); unset: no dumps.
DEBUG_DIR_VARIABLE = "BI_COMPILE_DEBUG_DIR"
_dumped_graphs = itertools.count()


def run_pipeline(graph: Graph, *, strict: bool = False, native_launch: bool = False) -> Report:
    """Rewrite ``graph`` in place, record and return its report; raise in strict mode if anything is left.
    ``native_launch``: the graph goes to Inductor, which may emit the bi kernels' launches itself (pass 6)."""
    debug_dir = os.environ.get(DEBUG_DIR_VARIABLE)
    prefix = Path(debug_dir) / f"graph{next(_dumped_graphs):03d}" if debug_dir else None

    def run(step: int, name: str, fn, count=lambda result: sum(result.values())):
        if prefix:
            _dump(graph, prefix, step, name, "before")
        result = fn(graph)
        if prefix:
            _dump(graph, prefix, step, name, "after")
        logger.debug("bi_compile pass %s: %d", name, count(result))
        return result

    rewrites = (run(1, "unfuse_add_rms_norm", unfuse_add_rms_norm_pass)
                + run(2, "written_rms_norm", written_rms_norm_pass) + run(3, "replace", replace_pass))
    graph.eliminate_dead_code()
    copies, copied_inputs = run(4, "contiguous", contiguous_pass, lambda result: sum(result[0].values()))
    report = run(5, "audit", audit_pass, lambda result: len(result.findings))
    report.rewrites, report.copies, report.copied_inputs = dict(rewrites), dict(copies), copied_inputs
    if native_launch:
        report.native_launches = dict(run(6, "native_launch", native_launch_pass))
    graph.lint()
    return record_report(report, strict=strict)


def _dump(graph: Graph, prefix: Path, step: int, name: str, when: str) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}-{step}-{name}-{when}.txt").write_text(str(graph))


class BatchInvariantPass(CustomGraphPass):
    """The pipeline as an Inductor custom pass (``post_grad_custom_pre_pass`` / vLLM's ``post_grad_custom_post_pass``)."""

    def __init__(self, *, strict: bool = False, native_launch: bool = False):
        self.strict = strict
        self.native_launch = native_launch

    def __call__(self, graph: Graph) -> None:
        run_pipeline(graph, strict=self.strict, native_launch=self.native_launch)

    def uuid(self) -> str:
        return f"{source_hash()}-strict={self.strict}-native_launch={self.native_launch}"


def audit_exported(exported: torch.export.ExportedProgram) -> Report:
    """The report the pipeline gives for an exported program (the program itself is left as it is)."""
    table = decompositions_keeping_rewritten_ops(torch.export.default_decompositions())
    module = copy.deepcopy(exported).run_decompositions(table).graph_module
    return run_pipeline(module.graph)
