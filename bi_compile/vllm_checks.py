"""The vLLM settings that break batch invariance, and the check of the engine compiling now.

Used by the plugin (``bi_compile.vllm_plugin``), the piecewise route's pass (``bi_compile.vllm_pass``) and the
whole-graph route's backend; every vLLM import is deferred to the call, so importing this imports no vLLM.
"""

from __future__ import annotations

import os
import sys

SWITCH = "BI_COMPILE_VLLM"

# vLLM's ``AttentionBackendEnum`` names whose split of the keys is fixed once ``VLLM_BATCH_INVARIANT=1``
# (FLASH_ATTN: num_splits=1; TRITON_ATTN: no 3-D split-softmax path; FLEX_ATTENTION: 16x16 blocks). CPU_ATTN is the
# only backend of the CPU platform; its split is pinned off through VLLM_CPU_ATTN_SPLIT_KV.
INVARIANT_ATTENTION_BACKENDS = {"gpu": ("FLASH_ATTN", "TRITON_ATTN", "FLEX_ATTENTION"), "cpu": ("CPU_ATTN",)}


class VllmSettingError(RuntimeError):
    """A vLLM setting that breaks batch invariance while ``BI_COMPILE_VLLM=1``; the message names the setting."""


def switched_on() -> bool:
    value = os.environ.get(SWITCH, "0")
    if value not in ("0", "1"):
        raise VllmSettingError(f"{SWITCH} must be 0 or 1, got {value!r}")
    return value == "1"


def platform_kind() -> str:
    from vllm.platforms import current_platform

    return "cpu" if current_platform.is_cpu() else "gpu"


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
