"""bi-compile inside vLLM (0.32 is the reference): the pass object for vLLM's ``inductor_passes``, and the
``vllm.general_plugins`` entry point.

Two routes switch batch invariance on from vLLM's command line (docs/vllm.md has the details):

    whole graph:  --compilation-config '{"mode": "DYNAMO_TRACE_ONCE", "backend": "bi_ascend",
                                         "cudagraph_mode": "FULL_DECODE_ONLY"}'
    piecewise:    --compilation-config '{"inductor_passes":
                                         {"post_grad_custom_post_pass": "bi_compile.post_grad_pass"}}'

The piecewise route hands vLLM the object ``bi_compile.post_grad_pass``. vLLM resolves the name with
``__import__("bi_compile").__dict__["post_grad_pass"]`` and keeps the object as it is only if it is an instance of
its own ``InductorPass``; anything else it wraps in ``CallableInductorPass``, whose ``uuid()`` hashes the source of
the wrapper's class only, so a change to a pass file would not reach vLLM's compile-cache key. Hence the pass is
built as a subclass of both ``BatchInvariantPass`` (first, so its ``uuid()`` wins) and vLLM's ``InductorPass`` —
but only when vLLM is already imported: importing vLLM costs seconds and patches torch, which ``import bi_compile``
must never do.

The plugin (``register``) runs in every vLLM process (front end, engine core, workers) before vLLM builds its
engine config. It is inert unless ``BI_COMPILE_VLLM=1``. Switched on, it

1. pins the environment variables below (each only where it is unset; a conflicting value set by the user is
   refused, naming the variable), so that what vLLM runs outside our graphs keeps one reduction order;
2. wires the pipeline in as Inductor's ``post_grad_custom_pre_pass`` for graphs that vLLM compiles with Inductor
   in modes 1 and 2 (CPU's default) when no route is named; in mode 3 (``VLLM_COMPILE``) vLLM's compile cache
   cannot see a process-wide pass, so there it refuses and asks for the piecewise route instead;
3. checks vLLM's settings when the first graph is compiled (the only moment a plugin sees vLLM's config in 0.32)
   and refuses those known to break invariance: attention backends without a fixed split, the fused
   all-reduce + RMSNorm, ...

``VLLM_BATCH_INVARIANT=1`` alone does not switch the plugin on: it is vLLM's own mode, with its own aten overrides.
On a GPU the plugin sets it (it is the only 0.32 switch that fixes the attention split; it also routes vLLM's linear
layers and RMSNorm to vLLM's own Triton kernels, which the pass then leaves alone), on a CPU it leaves it alone.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import torch

from bi_compile.passes.pipeline import BatchInvariantPass

logger = logging.getLogger(__name__)

SWITCH = "BI_COMPILE_VLLM"

# vLLM's ``AttentionBackendEnum`` names whose split of the keys is fixed once ``VLLM_BATCH_INVARIANT=1``
# (FLASH_ATTN: num_splits=1; TRITON_ATTN: no 3-D split-softmax path; FLEX_ATTENTION: 16x16 blocks). CPU_ATTN is the
# only backend of the CPU platform; its split is pinned off through VLLM_CPU_ATTN_SPLIT_KV.
INVARIANT_ATTENTION_BACKENDS = {"gpu": ("FLASH_ATTN", "TRITON_ATTN", "FLEX_ATTENTION"), "cpu": ("CPU_ATTN",)}


class VllmSettingError(RuntimeError):
    """A vLLM setting that breaks batch invariance while ``BI_COMPILE_VLLM=1``; the message names the setting."""


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
    EnvPin("VLLM_CPU_ATTN_SPLIT_KV", "0", "cpu",
           "CPU attention splits a long sequence's keys over threads by a plan made for the whole batch"),
    EnvPin("VLLM_BATCH_INVARIANT", "1", "gpu",
           "it is vLLM 0.32's only switch that fixes the attention split (FLASH_ATTN num_splits=1, TRITON_ATTN "
           "without its 3-D split, FLEX_ATTENTION 16x16 blocks) and covers the lm_head and sampler, which run "
           "eagerly outside the compiled graph"),
    EnvPin("VLLM_USE_BREAKABLE_CUDAGRAPH", "0", "gpu",
           "breakable CUDA graphs set the compilation mode to NONE, so no graph would reach bi-compile"),
)


def switched_on() -> bool:
    value = os.environ.get(SWITCH, "0")
    if value not in ("0", "1"):
        raise VllmSettingError(f"{SWITCH} must be 0 or 1, got {value!r}")
    return value == "1"


def platform_kind() -> str:
    from vllm.platforms import current_platform

    return "cpu" if current_platform.is_cpu() else "gpu"


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


def check_vllm_config(config) -> list[str]:
    """The settings of a ``VllmConfig`` known to break batch invariance, each as one line naming the setting."""
    from vllm.config import CompilationMode

    problems = []
    platform = platform_kind()
    compilation = config.compilation_config
    backend = config.attention_config.backend
    if backend is not None and backend.name not in INVARIANT_ATTENTION_BACKENDS[platform]:
        problems.append(f"attention backend {backend.name} (--attention-backend) has no fixed split size; use one "
                        f"of {', '.join(INVARIANT_ATTENTION_BACKENDS[platform])}")
    if compilation.pass_config.fuse_allreduce_rms:
        problems.append("pass_config.fuse_allreduce_rms=true fuses the all-reduce with RMSNorm, which is not "
                        "batch-invariant (vLLM's own mode turns it off too)")
    if compilation.mode in (CompilationMode.STOCK_TORCH_COMPILE, CompilationMode.DYNAMO_TRACE_ONCE) and \
            compilation.backend not in ("bi_ascend", "inductor"):
        problems.append(f"compilation backend {compilation.backend!r} runs no bi-compile pass; use \"bi_ascend\" "
                        "or \"inductor\"")
    if platform == "gpu" and config.parallel_config.tensor_parallel_size > 1 and \
            not config.parallel_config.disable_custom_all_reduce and \
            os.environ.get("VLLM_CUSTOM_ALLREDUCE_ALGO") != "1stage":
        problems.append("custom all-reduce (tensor_parallel_size > 1) without VLLM_CUSTOM_ALLREDUCE_ALGO=1stage "
                        "reduces in an order that depends on the message size; set VLLM_BATCH_INVARIANT=1 or "
                        "--disable-custom-all-reduce")
    return problems


_checked = False


def check_running_vllm() -> None:
    """Refuse, once per process, the settings of the vLLM engine compiling now (no-op outside vLLM / plugin off)."""
    global _checked
    if _checked or "vllm" not in sys.modules or not switched_on():
        return
    from vllm.config import get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    if config is None:
        return
    _checked = True
    problems = check_vllm_config(config)
    if problems:
        raise VllmSettingError(f"{SWITCH}=1: settings that break batch invariance:\n  " + "\n  ".join(problems))


def vllm_pass_class() -> type:
    """``BatchInvariantPass`` as a vLLM ``InductorPass`` (built on first use; needs vLLM imported)."""
    if "VllmBatchInvariantPass" in globals():
        return globals()["VllmBatchInvariantPass"]
    from vllm.compilation.passes.inductor_pass import InductorPass

    class VllmBatchInvariantPass(BatchInvariantPass, InductorPass):
        """The pipeline at vLLM's ``post_grad_custom_post_pass`` slot: after vLLM's fusions, before it lowers its
        ``vllm_ir`` ops; ``uuid()`` is the pipeline's (sources + options), which vLLM folds into its cache key."""

        def __call__(self, graph: torch.fx.Graph) -> None:
            check_running_vllm()
            super().__call__(graph)

    # A module-level name, so that pickle (vLLM ships its config to the engine and worker processes) finds it.
    VllmBatchInvariantPass.__module__ = __name__
    VllmBatchInvariantPass.__qualname__ = "VllmBatchInvariantPass"
    globals()["VllmBatchInvariantPass"] = VllmBatchInvariantPass
    return VllmBatchInvariantPass


def __getattr__(name: str):
    # Unpickling in a fresh worker looks the class up before anyone has built it.
    if name == "VllmBatchInvariantPass":
        return vllm_pass_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_post_grad_pass() -> BatchInvariantPass:
    """What ``bi_compile.post_grad_pass`` is: vLLM-typed where vLLM is imported, the plain pipeline elsewhere."""
    return vllm_pass_class()() if "vllm" in sys.modules else BatchInvariantPass()


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

    # vLLM is imported by now: make sure the piecewise route's object is vLLM-typed whatever the import order was.
    if not isinstance(getattr(bi_compile, "post_grad_pass", None), vllm_pass_class()):
        bi_compile.post_grad_pass = make_post_grad_pass()
    if not switched_on():
        return
    set_now = pin_environment(platform_kind())
    if set_now:
        logger.info("bi-compile: %s=1 set %s", SWITCH, ", ".join(f"{p.name}={p.value}" for p in set_now))
    from torch._inductor import config as inductor_config

    if inductor_config.post_grad_custom_pre_pass is None:
        inductor_config.post_grad_custom_pre_pass = DefaultRoutePass()
