"""The piecewise route's pass as vLLM wants it: ``bi_compile.post_grad_pass`` where vLLM is imported.

vLLM resolves ``"bi_compile.post_grad_pass"`` and keeps the object as it is only if it is an instance of its own
``InductorPass``; anything else it wraps in ``CallableInductorPass``, whose ``uuid()`` hashes the wrapper's class
source only, so a change to a pass file would not reach vLLM's compile-cache key (docs/vllm.md, "What
``bi_compile.post_grad_pass`` must be"). This module imports vLLM, so only ``bi_compile.vllm_plugin`` imports it,
once vLLM is imported; a module-level class is what pickle finds when vLLM ships its config to its workers.
"""

from __future__ import annotations

import torch
from vllm.compilation.passes.inductor_pass import InductorPass

from bi_compile.passes import BatchInvariantPass
from bi_compile.vllm_checks import check_running_vllm


class VllmBatchInvariantPass(BatchInvariantPass, InductorPass):
    """The pipeline at vLLM's ``post_grad_custom_post_pass`` slot: after vLLM's fusions, before it lowers its
    ``vllm_ir`` ops. ``BatchInvariantPass`` comes first in the bases, so ``uuid()`` is the pipeline's (sources and
    options), which vLLM folds into its cache key."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        check_running_vllm()
        super().__call__(graph)
