"""FX passes that make a captured ATen graph batch-invariant (shipped as ``bi_compile.passes``).

``pipeline`` owns the order; each other module is one pass. See ``pipeline.py``'s docstring.
"""

from .audit import Finding, Report
from .pipeline import (BatchInvarianceError, BatchInvarianceWarning, BatchInvariantPass,
                       audit_exported, clear_reports, last_report, reports, run_pipeline)

__all__ = ["BatchInvarianceError", "BatchInvarianceWarning", "BatchInvariantPass", "Finding", "Report",
           "audit_exported", "clear_reports", "last_report", "reports", "run_pipeline"]
