"""The vLLM settings that break batch invariance, and the check of the engine compiling now.

Used by the plugin (``bi_compile.vllm_plugin``), the piecewise route's pass (``bi_compile.vllm_pass``) and the
whole-graph route's backend; every vLLM import is deferred to the call, so importing this imports no vLLM.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

SWITCH = "BI_COMPILE_VLLM"

# With the switch on, attention is bi-compile's BI_ATTN: vLLM's AttentionBackendEnum.CUSTOM, selected by our platform
# (bi_compile/vllm_platform.py, a ``vllm.platform_plugins`` entry point).
BI_PLATFORM_MODULE = "bi_compile.vllm_platform"

# Where bi-compile's GPU worker writes the one fused-MoE config per (E, N) that vLLM then reads for every batch size
# (bi_compile/vllm_moe.py), and which the plugin pins as VLLM_TUNED_CONFIG_FOLDER: the same path in every process of
# one user.
MOE_CONFIG_FOLDER = str(Path(tempfile.gettempdir()) / f"bi-compile-moe-configs-{os.getuid()}")


# What bi-compile's vLLM parts ran in this process, by name, one count per call: the attention backend
# ("BI_ATTN forward"), the lm_head and the sampler's row ops (bi_compile/vllm_worker.py). Tests read it from the
# worker (LLM.collective_rpc) to show that these really ran; nothing in bi-compile reads it.
RAN: Counter[str] = Counter()


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
    from vllm.platforms import current_platform

    problems = []
    platform = platform_kind()
    compilation = config.compilation_config
    if type(current_platform).__module__ != BI_PLATFORM_MODULE:
        problems.append(f"vLLM runs on {type(current_platform).__name__}, not bi-compile's platform, so its own "
                        "attention runs: the vllm.platform_plugins entry point bi_compile did not activate "
                        "(VLLM_TARGET_DEVICE=cpu makes vLLM skip platform plugins; an install of bi-compile without "
                        "that entry point needs reinstalling)")
    backend = config.attention_config.backend
    if backend is None or backend.name != "CUSTOM":
        problems.append(f"attention backend {getattr(backend, 'name', backend)} (--attention-backend) is not "
                        "bi-compile's BI_ATTN (AttentionBackendEnum.CUSTOM)")
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
                        "reduces in an order that depends on the message size (bi-compile's platform turns it off; "
                        "did it activate?); set --disable-custom-all-reduce")
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
