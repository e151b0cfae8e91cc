"""bi-compile: batch-invariant LLM inference in graph mode.

``torch.compile(model, backend="bi_ascend")`` rewrites every batch-variant reduction of the captured graph to a
``torch.ops.bi.*`` op; ``post_grad_pass`` is the same pipeline for vLLM's piecewise mode
(``{"inductor_passes": {"post_grad_custom_post_pass": "bi_compile.post_grad_pass"}}``).
"""

from bi_compile import ops  # noqa: F401  (registers torch.ops.bi.*)
from bi_compile.passes import BatchInvariantPass, Report, clear_reports, last_report, reports

from bi_compile.vllm_plugin import make_post_grad_pass

# A vLLM InductorPass where vLLM is imported (so vLLM keeps our uuid() in its cache key), the plain pass elsewhere.
post_grad_pass = make_post_grad_pass()

__all__ = ["BatchInvariantPass", "Report", "clear_reports", "last_report", "post_grad_pass", "reports"]
