"""FX passes that make a captured ATen graph batch-invariant (shipped as ``bi_compile.passes``).

``pipeline`` owns the pass order and runs it; each of ``unfuse_add_rms_norm``, ``written_rms_norm``, ``replace``,
``contiguous`` and ``audit`` is one pass; ``report`` holds what the audit found and the record of every graph's report;
``cache_hash`` the version key of all of it. Code outside this package imports from the package only.
"""

from .audit import declare_invariant
from .pipeline import BatchInvariantPass, audit_exported, run_pipeline
from .replace import REPLACEMENTS, decompositions_keeping_rewritten_ops
from .report import (BatchInvarianceError, BatchInvarianceWarning, Finding, Report, clear_reports, last_report,
                     record_report, reports)
from .cache_hash import source_hash

__all__ = ["REPLACEMENTS", "BatchInvarianceError", "BatchInvarianceWarning", "BatchInvariantPass", "Finding", "Report",
           "audit_exported", "clear_reports", "declare_invariant", "decompositions_keeping_rewritten_ops", "last_report", "record_report",
           "reports", "run_pipeline", "source_hash"]
