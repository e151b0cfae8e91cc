"""What the pipeline found in a graph (``Report``, ``Finding``), and the record of every graph's report.

``run_pipeline`` records one report per graph it rewrites; the backend replays the saved reports of graphs that
Inductor serves from its cache (``bi_compile/report_cache.py``). ``reports()`` is what users read.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

_REPORTS: list[Report] = []


@dataclass
class Finding:
    node: str
    target: str
    kind: str  # "variant" | "unknown"
    source: str  # "file.py:123  code", from node.meta['stack_trace']


@dataclass
class Report:
    rewrites: dict[str, int] = field(default_factory=dict)  # "aten.mm.default -> bi.linear": 4
    copies: dict[str, int] = field(default_factory=dict)  # "bi::softmax:self": 1 (contiguous copies inserted)
    copied_inputs: list[str] = field(default_factory=list)  # graph inputs copied on every call (should be none)
    # bi op calls whose kernel launch Inductor emits itself (passes/native_launch.py): "bi.rms_norm.default": 2
    native_launches: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: {"invariant": 0, "variant": 0, "unknown": 0})
    findings: list[Finding] = field(default_factory=list)
    # Other libraries' ops counted invariant by construction (passes/audit.py): target -> why.
    by_construction: dict[str, str] = field(default_factory=dict)
    cached_graphs: int = 0  # graphs Inductor loaded from its cache, audited when compiled (counted above)
    unaudited_graphs: int = 0  # graphs Inductor loaded from its cache with no audit on record (not counted)

    @property
    def invariant(self) -> bool:
        return not self.findings

    @classmethod
    def merge(cls, reports) -> Report:
        merged = cls()
        for report in reports:
            for mine, theirs in ((merged.rewrites, report.rewrites), (merged.copies, report.copies),
                                 (merged.native_launches, report.native_launches), (merged.counts, report.counts)):
                for key, n in theirs.items():
                    mine[key] = mine.get(key, 0) + n
            merged.copied_inputs += report.copied_inputs
            merged.findings += report.findings
            merged.by_construction.update(report.by_construction)
            merged.cached_graphs += report.cached_graphs
            merged.unaudited_graphs += report.unaudited_graphs
        return merged

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, fields: dict) -> Report:
        return cls(**{**fields, "findings": [Finding(**finding) for finding in fields["findings"]]})

    def format(self) -> str:
        lines = [f"nodes: {self.counts['invariant']} invariant, {self.counts['variant']} variant, "
                 f"{self.counts['unknown']} unknown"]
        lines += [f"  rewrote {n:4d} x {rewrite}" for rewrite, n in sorted(self.rewrites.items())]
        lines += [f"  copied  {n:4d} x {where} (layout contract)" for where, n in sorted(self.copies.items())]
        lines += [f"  launched {n:3d} x {op} from Inductor's code (native launch)"
                  for op, n in sorted(self.native_launches.items())]
        lines += [f"  copies graph input {name} on every call" for name in self.copied_inputs]
        lines += [f"  invariant by construction: {target} ({why})" for target, why in sorted(self.by_construction.items())]
        lines += [f"  {f.kind:8s} {f.target}  ({f.node})  {f.source or 'no source line'}" for f in self.findings]
        if self.cached_graphs:
            lines.append(f"  {self.cached_graphs} graph(s) loaded from Inductor's cache: counted above as audited "
                         "when they were compiled")
        if self.unaudited_graphs:
            lines.append(f"  {self.unaudited_graphs} graph(s) loaded from Inductor's cache with no audit on record, "
                         "not counted above: TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 audits them again")
        return "\n".join(lines)


class BatchInvarianceError(RuntimeError):
    def __init__(self, report: Report):
        self.report = report
        lines = [f"{f.kind} {f.target} ({f.node}) at {f.source or 'unknown source line'}" for f in report.findings]
        super().__init__(f"{len(lines)} node(s) are not batch-invariant (strict mode):\n  " + "\n  ".join(lines))


class BatchInvarianceWarning(UserWarning):
    pass


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


def reports() -> list[Report]:
    """The report of every graph the pipeline ran on since the last ``clear_reports()``."""
    return list(_REPORTS)


def last_report() -> Report | None:
    return _REPORTS[-1] if _REPORTS else None


def clear_reports() -> None:
    _REPORTS.clear()
