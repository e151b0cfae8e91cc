"""The ``vllm.platform_plugins`` entry point: vLLM's own CPU or CUDA platform, with bi-compile's attention
(``BI_ATTN``, bi_compile/vllm_attention.py) selected when ``BI_COMPILE_VLLM=1``.

Why a platform and not only ``register_backend``: the registry makes ``AttentionBackendEnum.CUSTOM`` resolve to our
class, but something must select it. On a GPU vLLM honours a selected backend; on a CPU
``CpuPlatform.get_attn_backend_cls`` (0.32) returns CPU_ATTN whatever was selected. A platform plugin is vLLM's
supported way to own that choice: the classes below are vLLM's ``CpuPlatform`` / ``CudaPlatform`` with two methods
extended, nothing of vLLM patched:

- ``check_and_update_config``: refuses a vLLM that bi-compile's classes do not fit (``vllm_compat``, naming what
  it lacks); selects CUSTOM where the user named no backend; refuses a backend the user named, naming it (the whole
  point is that no other attention runs); names bi-compile's worker class (``BiCPUWorker`` / ``BiGPUWorker`` in
  ``bi_compile.vllm_worker``: the lm_head through ``bi.linear``, the sampler's row ops through the bi row ops),
  refusing a worker class the user named; on a GPU it selects vLLM's Triton fused MoE (``--moe-backend triton``,
  refusing another named one: bi_compile/vllm_moe.py pins its config) and with ``tensor_parallel_size > 1`` turns
  vLLM's custom all-reduce off (its reduction order depends on the message size) unless
  ``VLLM_CUSTOM_ALLREDUCE_ALGO=1stage``;
- ``get_attn_backend_cls``: returns ``BI_ATTN`` for CUSTOM, after vLLM's own ``validate_configuration``.

The entry point activates only with ``BI_COMPILE_VLLM=1`` and only where vLLM's built-in detection finds the CPU or
CUDA platform (an out-of-tree platform wins over the built-in ones). vLLM skips platform plugins when
``VLLM_TARGET_DEVICE=cpu``; the plugin's config check refuses that case (``vllm_checks``).
"""

from __future__ import annotations

import functools
import logging
import os

from bi_compile.passes import declare_invariant
from bi_compile.vllm_checks import SWITCH, VllmSettingError, switched_on
from bi_compile.vllm_compat import check_vllm_api

logger = logging.getLogger(__name__)

BACKEND_PATH = "bi_compile.vllm_attention.BiAttentionBackend"
# vLLM's attention op in compiled graphs, and why the audit counts it invariant once this platform picked BI_ATTN.
ATTENTION_OP = "vllm::unified_attention_with_output"
ATTENTION_REASON = "its layer runs BI_ATTN (bi::paged_attention), the only attention backend bi-compile's platform allows"
# vLLM's built-in platform (as its detection names it) -> ours.
PLATFORMS = {
    "vllm.platforms.cpu.CpuPlatform": "bi_compile.vllm_platform.BiCpuPlatform",
    "vllm.platforms.cuda.CudaPlatform": "bi_compile.vllm_platform.BiCudaPlatform",
}


def platform_plugin() -> str | None:
    """The ``vllm.platform_plugins`` entry point: our platform's class path, or None (vLLM's own is used)."""
    if not switched_on():
        return None
    from vllm.platforms import builtin_platform_plugins

    for name in ("cuda", "cpu"):
        found = builtin_platform_plugins[name]()
        if found in PLATFORMS:
            return PLATFORMS[found]
    return None


def register_backend_class() -> None:
    """Make ``AttentionBackendEnum.CUSTOM`` resolve to ``BI_ATTN`` in this process; refuse another owner of CUSTOM."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    custom = AttentionBackendEnum.CUSTOM
    if custom.is_overridden() and custom.get_path() != BACKEND_PATH:
        raise VllmSettingError(f"{SWITCH}=1 needs AttentionBackendEnum.CUSTOM for bi-compile's attention, but "
                               f"{custom.get_path()} is registered there")
    register_backend(custom, BACKEND_PATH)


def select_attention(attention_config) -> None:
    """CUSTOM (bi-compile's BI_ATTN) where no backend is named; a named different one is refused by name."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    register_backend_class()
    named = {"--attention-backend": attention_config.backend,
             **{f"backend_per_kind[{kind!r}]": backend
                for kind, backend in getattr(attention_config, "backend_per_kind", {}).items()}}
    others = [f"{flag} {backend.name}" for flag, backend in named.items()
              if backend is not None and backend != AttentionBackendEnum.CUSTOM]
    if others:
        raise VllmSettingError(
            f"{SWITCH}=1 runs attention through bi-compile's batch-invariant BI_ATTN backend; the attention backend "
            f"named by {', '.join(others)} would replace it: drop it, or unset {SWITCH}")
    attention_config.backend = AttentionBackendEnum.CUSTOM


# vLLM's worker class (as its platform picks it) -> bi-compile's, which owns the lm_head and the sampler
# (bi_compile/vllm_worker.py).
WORKERS = {
    "vllm.v1.worker.cpu_worker.CPUWorker": "bi_compile.vllm_worker.BiCPUWorker",
    "vllm.v1.worker.gpu_worker.Worker": "bi_compile.vllm_worker.BiGPUWorker",
}


def select_worker(parallel_config) -> None:
    """bi-compile's worker in place of the one vLLM's platform picked; a worker class the user named is refused."""
    chosen = parallel_config.worker_cls
    if chosen in WORKERS.values():
        return
    if chosen not in WORKERS:
        raise VllmSettingError(
            f"{SWITCH}=1 runs the lm_head and the sampler through bi-compile's worker "
            f"({' or '.join(WORKERS.values())}); the worker class {chosen} (--worker-cls) would replace it: drop "
            f"it, or unset {SWITCH}")
    parallel_config.worker_cls = WORKERS[chosen]


def select_moe_backend(kernel_config) -> None:
    """On a GPU, vLLM's Triton fused MoE, whose config bi-compile's worker pins for every batch size
    (bi_compile/vllm_moe.py); a MoE backend the user named is refused by name (FlashInfer's and CUTLASS's kernels
    are closed to that pin)."""
    if kernel_config.moe_backend not in ("auto", "triton"):
        raise VllmSettingError(
            f"{SWITCH}=1 runs vLLM's fused MoE on its Triton backend with one config for every batch size; the MoE "
            f"backend named by --moe-backend {kernel_config.moe_backend} would replace it: drop it, or unset {SWITCH}")
    kernel_config.moe_backend = "triton"


def select_all_reduce(parallel_config) -> None:
    """On a GPU with tensor parallelism, vLLM's custom all-reduce off: its kernel (one-stage or two-stage, picked by
    the message size) sums in an order that follows the batch. Its one-stage form, named by the user, stays."""
    if parallel_config.tensor_parallel_size > 1 and not parallel_config.disable_custom_all_reduce and \
            os.environ.get("VLLM_CUSTOM_ALLREDUCE_ALGO") != "1stage":
        parallel_config.disable_custom_all_reduce = True
        logger.info("bi-compile: %s=1 turned vLLM's custom all-reduce off (tensor_parallel_size %d)", SWITCH,
                    parallel_config.tensor_parallel_size)


class BiAttentionPlatform:
    """The two methods our platforms extend; mixed in before vLLM's platform class."""

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        kind = "cpu" if cls.device_type == "cpu" else "gpu"
        check_vllm_api(kind)
        super().check_and_update_config(vllm_config)
        select_attention(vllm_config.attention_config)
        select_worker(vllm_config.parallel_config)
        if kind == "gpu":
            select_moe_backend(vllm_config.kernel_config)
            select_all_reduce(vllm_config.parallel_config)

    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads: int | None = None) -> str:
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        if selected_backend != AttentionBackendEnum.CUSTOM:
            return super().get_attn_backend_cls(selected_backend, attn_selector_config, num_heads)
        register_backend_class()
        problems = selected_backend.get_class().validate_configuration(
            device_capability=cls.get_device_capability(), **attn_selector_config._asdict())
        if problems:
            raise VllmSettingError(f"{SWITCH}=1: bi-compile's BI_ATTN cannot run this model's attention: "
                                   + "; ".join(problems))
        # check_and_update_config refused every other backend, so each attention layer of this process runs BI_ATTN.
        declare_invariant(ATTENTION_OP, ATTENTION_REASON)
        return BACKEND_PATH


@functools.cache
def _platform(name: str) -> type:
    """Each class imports only its own vLLM platform (vllm.platforms.cuda imports CUDA bindings a CPU install may
    lack); built once, so the class vLLM resolves by name is one object."""
    if name == "BiCpuPlatform":
        from vllm.platforms.cpu import CpuPlatform as base
    else:
        from vllm.platforms.cuda import CudaPlatform as base
    return type(name, (BiAttentionPlatform, base), {"__module__": __name__, "__qualname__": name})


def __getattr__(name: str) -> type:
    if name in ("BiCpuPlatform", "BiCudaPlatform"):
        return _platform(name)
    raise AttributeError(name)
