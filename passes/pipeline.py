"""The batch-invariance pipeline: the one place that owns the pass order.

Over an ATen-level, functionalized FX graph (Inductor's post-grad graph, aot_autograd's forward graph, vLLM's
piecewise graphs), in this order:

1. ``unfuse_add_rms_norm`` — fused residual-add + RMSNorm ops become ``aten.add`` + ``bi.rms_norm``;
2. ``replace`` — every op of the replacement table becomes its ``bi`` op (then dead code is dropped);
3. ``contiguous`` — ``.contiguous()`` in front of exactly the bi-op inputs that break a layout contract;
4. ``audit`` — every remaining node is classified invariant / variant / unknown, with its source line.

The order matters: unfusing first leaves one form of rmsnorm; layouts are checked only once all bi ops exist; the
audit sees the final graph. ``BatchInvariantPass`` is an Inductor ``CustomGraphPass`` whose ``uuid()`` hashes the
source of the passes and of the op contracts, so Inductor's and vLLM's compile caches change when they do.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx import Graph

from .audit import Report, audit_pass
from .contiguous import contiguous_pass
from .replace import aten_ops_kept_whole, replace_pass
from .unfuse_add_rms_norm import unfuse_add_rms_norm_pass

_REPORTS: list[Report] = []


class BatchInvarianceError(RuntimeError):
    def __init__(self, report: Report):
        self.report = report
        lines = [f"{f.kind} {f.target} ({f.node}) at {f.source or 'unknown source line'}" for f in report.findings]
        super().__init__(f"{len(lines)} node(s) are not batch-invariant (strict mode):\n  " + "\n  ".join(lines))


class BatchInvarianceWarning(UserWarning):
    pass


def run_pipeline(graph: Graph, *, strict: bool = False) -> Report:
    """Rewrite ``graph`` in place, record and return its report; raise in strict mode if anything is left."""
    rewrites = unfuse_add_rms_norm_pass(graph) + replace_pass(graph)
    graph.eliminate_dead_code()
    copies, copied_inputs = contiguous_pass(graph)
    report = audit_pass(graph)
    report.rewrites, report.copies, report.copied_inputs = dict(rewrites), dict(copies), copied_inputs
    graph.lint()
    return record_report(report, strict=strict)


def record_report(report: Report, *, strict: bool) -> Report:
    """Keep ``report`` for ``reports()``; raise in strict mode if it has findings, else warn about them and about a
    graph served from a cache with no audit on record (strict mode never caches a graph that failed its audit)."""
    _REPORTS.append(report)
    if report.findings and strict:
        raise BatchInvarianceError(report)
    if report.findings:
        names = ", ".join(sorted({f.target for f in report.findings}))
        warnings.warn(f"bi_compile: {len(report.findings)} node(s) left batch-variant or unknown ({names}); "
                      "bi_compile.last_report().format() lists them by source line", BatchInvarianceWarning,
                      stacklevel=3)
    if report.unaudited_graphs and not strict:
        warnings.warn("bi_compile: a graph was loaded from Inductor's cache with no batch-invariance report on record; "
                      "TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 compiles and audits it again", BatchInvarianceWarning,
                      stacklevel=3)
    return report


class BatchInvariantPass(CustomGraphPass):
    """The pipeline as an Inductor custom pass (``post_grad_custom_pre_pass`` / vLLM's ``post_grad_custom_post_pass``)."""

    def __init__(self, *, strict: bool = False):
        self.strict = strict

    def __call__(self, graph: Graph) -> None:
        run_pipeline(graph, strict=self.strict)

    def uuid(self) -> str:
        return f"{source_hash()}-strict={self.strict}"


def source_hash() -> str:
    """A hash of everything that decides the rewritten graph and its report: the passes, the op definitions with their
    contracts, and how reports are kept for cached graphs (a graph cached before that changed has none on record)."""
    import bi_compile.ops
    import bi_compile.report_cache

    digest = hashlib.sha256()
    paths = [Path(bi_compile.report_cache.__file__)]
    for folder in (Path(__file__).parent, Path(bi_compile.ops.__file__).parent):
        paths += sorted(folder.glob("*.py"))
    for path in paths:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:32]


def decompositions_keeping_rewritten_ops(table: dict) -> dict:
    """``table`` less the ops the pipeline rewrites, so they reach it whole instead of as mul/sum/exp."""
    kept = aten_ops_kept_whole()
    return {op: fn for op, fn in table.items() if op not in kept}


def audit_exported(exported: torch.export.ExportedProgram) -> Report:
    """The report the pipeline gives for an exported program (the program itself is left as it is)."""
    table = decompositions_keeping_rewritten_ops(torch.export.default_decompositions())
    module = copy.deepcopy(exported).run_decompositions(table).graph_module
    return run_pipeline(module.graph)


def reports() -> list[Report]:
    """The report of every graph the pipeline ran on since the last ``clear_reports()``."""
    return list(_REPORTS)


def last_report() -> Report | None:
    return _REPORTS[-1] if _REPORTS else None


def clear_reports() -> None:
    _REPORTS.clear()
