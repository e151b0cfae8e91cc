"""bi-compile inside vLLM (0.32 is the reference): the pass object for vLLM's ``inductor_passes``, and the
``vllm.general_plugins`` entry point.

Two routes switch batch invariance on from vLLM's command line (docs/vllm.md has the details):

    whole graph:  --compilation-config '{"mode": "DYNAMO_TRACE_ONCE", "backend": "bi_ascend",
                                         "cudagraph_mode": "FULL_DECODE_ONLY"}'
    piecewise:    --compilation-config '{"inductor_passes":
                                         {"post_grad_custom_post_pass": "bi_compile.post_grad_pass"}}'

The piecewise route hands vLLM the object ``bi_compile.post_grad_pass``: where vLLM is imported, an instance of
``bi_compile.vllm_pass.VllmBatchInvariantPass`` (why: that module's docstring), elsewhere the plain pipeline, because
importing vLLM costs seconds and patches torch, which ``import bi_compile`` must never do.

The plugin (``register``) runs in every vLLM process (front end, engine core, workers) before vLLM builds its
engine config. It is inert unless ``BI_COMPILE_VLLM=1``. Switched on, it

1. pins the environment variables below (each only where it is unset; a conflicting value set by the user is
   refused, naming the variable), so that what vLLM runs outside our graphs keeps one reduction order;
2. wires the pipeline in as Inductor's ``post_grad_custom_pre_pass`` for graphs that vLLM compiles with Inductor
   in modes 1 and 2 (CPU's default) when no route is named; in mode 3 (``VLLM_COMPILE``) vLLM's compile cache
   cannot see a process-wide pass, so there it refuses and asks for the piecewise route instead;
3. checks vLLM's settings when the first graph is compiled (the only moment a plugin sees vLLM's config in 0.32)
   and refuses those known to break invariance: an attention other than bi-compile's BI_ATTN, the fused
   all-reduce + RMSNorm, ...

Attention is not in any graph bi-compile sees: with the switch on, bi-compile's ``vllm.platform_plugins`` entry point
(``bi_compile.vllm_platform``) selects its own paged attention backend, BI_ATTN (``bi_compile.vllm_attention``).

``VLLM_BATCH_INVARIANT=1`` alone does not switch the plugin on: it is vLLM's own mode, with its own aten overrides,
its own Triton matmul for the linear layers (opaque to the pass) and its own attention choice. With the switch on
it is refused (pinned to 0): bi-compile owns the attention (BI_ATTN), the linear layers (the pass), the lm_head and
the sampler (bi_compile/vllm_worker.py) on both platforms, and two owners of one op would leave it unclear which
one ran. What bi-compile does not own, the pins below keep fixed (NCCL, vLLM's own all-reduce kernels).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import torch

from bi_compile.passes import BatchInvariantPass
from bi_compile.vllm_checks import (MOE_CONFIG_FOLDER, SWITCH, VllmSettingError, check_running_vllm, platform_kind,
                                    switched_on)

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class EnvPin:
    name: str
    value: str
    platform: str  # "all" | "cpu" | "gpu"
    why: str


ENV_PINS = (
    EnvPin("VLLM_USE_AOT_COMPILE", "0", "all",
           "vLLM's AOT artifact cache key does not contain the bi_ascend pipeline's version, so a stale artifact "
           "could be loaded"),
    EnvPin("VLLM_BATCH_INVARIANT", "0", "all",
           "vLLM's own batch-invariant mode would take the linear layers (its Triton matmul, which the pass cannot "
           "see), the lm_head and the sampler from bi-compile; BI_COMPILE_VLLM=1 owns them: unset one of the two"),
    EnvPin("VLLM_USE_V2_MODEL_RUNNER", "0", "all",
           "bi-compile's worker swaps the V1 model runner's Sampler; vLLM picks the V2 runner, with another "
           "sampler, for dense models on a GPU"),
    EnvPin("VLLM_USE_BREAKABLE_CUDAGRAPH", "0", "gpu",
           "vLLM turns breakable CUDA graphs on by itself for some architectures (where this is unset), and they "
           "set the compilation mode to NONE, so no graph would reach bi-compile"),
    EnvPin("VLLM_TUNED_CONFIG_FOLDER", MOE_CONFIG_FOLDER, "gpu",
           "vLLM's fused MoE picks a Triton config per batch size from the tuned files there, and another tile "
           "changes the order in which an expert's products are summed; bi-compile's folder holds one config for "
           "every batch size"),
    EnvPin("VLLM_ALLREDUCE_USE_SYMM_MEM", "0", "gpu",
           "vLLM's symmetric-memory all-reduce picks its algorithm by message size, so a row's sum order would "
           "follow the batch (tensor_parallel_size > 1)"),
    # NCCL, for the collectives outside bi-compile's graphs (an eager step, a reduce-scatter the pass has no bi op
    # for): one algorithm, protocol and channel, so a reduction's order does not follow the message size.
    EnvPin("NCCL_ALGO", "allreduce:tree", "gpu",
           "NCCL picks ring or tree per message size; a ring sums each chunk starting at another rank, and which "
           "chunk an element falls in moves with the message size"),
    EnvPin("NCCL_PROTO", "Simple", "gpu",
           "the LL and LL128 protocols, picked per message size, cut a message into other pieces"),
    EnvPin("NCCL_MIN_NCHANNELS", "1", "gpu", "the channel count, picked per message size, splits the message"),
    EnvPin("NCCL_MAX_NCHANNELS", "1", "gpu", "the channel count, picked per message size, splits the message"),
    EnvPin("NCCL_NVLS_ENABLE", "0", "gpu", "NVLink SHARP reduces inside the switch, in an order NCCL does not fix"),
    EnvPin("NCCL_COLLNET_ENABLE", "0", "gpu", "CollNet reduces in the network, in an order NCCL does not fix"),
)
# Not pinned, and why: CUBLAS_WORKSPACE_CONFIG. On the bi routes no matmul is left to cuBLAS (the pass makes every
# mm/addmm/bmm in vLLM's graphs bi.linear, the worker the lm_head; the audit names any it could not), and the
# variable only makes cuBLAS repeatable run to run, not the same across batch sizes.


def pin_environment(platform: str) -> list[EnvPin]:
    """Set each pin of this platform where unset; refuse a conflicting value. Returns the pins it set."""
    pins = [pin for pin in ENV_PINS if pin.platform in ("all", platform)]
    conflicts = [f"{pin.name}={os.environ[pin.name]} (needs {pin.value}: {pin.why})"
                 for pin in pins if os.environ.get(pin.name, pin.value) != pin.value]
    if conflicts:
        raise VllmSettingError(f"{SWITCH}=1 cannot keep batch invariance with " + "; ".join(conflicts))
    set_now = [pin for pin in pins if pin.name not in os.environ]
    for pin in set_now:
        os.environ[pin.name] = pin.value
    return set_now


def make_post_grad_pass() -> BatchInvariantPass:
    """What ``bi_compile.post_grad_pass`` is: vLLM-typed where vLLM is imported, the plain pipeline elsewhere."""
    if "vllm" not in sys.modules:
        return BatchInvariantPass()
    from bi_compile.vllm_pass import VllmBatchInvariantPass

    return VllmBatchInvariantPass()


class DefaultRoutePass(BatchInvariantPass):
    """The pipeline the plugin installs as Inductor's ``post_grad_custom_pre_pass`` when no route is named.

    It stands aside when the piecewise route is configured (the pipeline then runs as vLLM's post pass) and refuses
    mode 3, where vLLM caches compiled graphs under a key that a process-wide Inductor setting does not reach."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        from torch._inductor import config as inductor_config
        from vllm.config import CompilationMode, get_current_vllm_config_or_none

        post_pass = inductor_config.post_grad_custom_post_pass
        # Directly, in vLLM's pass manager (mode 3), or wrapped by vLLM's CallableInductorPass.
        candidates = (post_pass, *getattr(post_pass, "passes", ()))
        if any(isinstance(getattr(p, "callable", p), BatchInvariantPass) for p in candidates):
            return
        config = get_current_vllm_config_or_none()
        if config is not None and config.compilation_config.mode == CompilationMode.VLLM_COMPILE:
            raise VllmSettingError(
                f"{SWITCH}=1 with compilation mode VLLM_COMPILE and no bi-compile route: name the piecewise route, "
                "--compilation-config '{\"inductor_passes\": {\"post_grad_custom_post_pass\": "
                "\"bi_compile.post_grad_pass\"}}'")
        check_running_vllm()
        super().__call__(graph)


def register() -> None:
    """The ``vllm.general_plugins`` entry point (runs in every vLLM process, possibly more than once)."""
    import bi_compile

    from bi_compile.vllm_pass import VllmBatchInvariantPass

    # vLLM is imported by now: make sure the piecewise route's object is vLLM-typed whatever the import order was.
    if not isinstance(getattr(bi_compile, "post_grad_pass", None), VllmBatchInvariantPass):
        bi_compile.post_grad_pass = make_post_grad_pass()
    if not switched_on():
        return
    set_now = pin_environment(platform_kind())
    if set_now:
        logger.info("bi-compile: %s=1 set %s", SWITCH, ", ".join(f"{p.name}={p.value}" for p in set_now))
    from torch._inductor import config as inductor_config

    if inductor_config.post_grad_custom_pre_pass is None:
        inductor_config.post_grad_custom_pre_pass = DefaultRoutePass()
