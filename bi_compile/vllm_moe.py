"""vLLM's fused MoE on a GPU under bi-compile: one Triton config for every batch size, and the router through
``bi.linear``.

A MoE layer reaches the compiled graph as one opaque op (``vllm::moe_forward``, ``vllm::moe_forward_shared``) that
runs, eagerly inside it:

- **the router gate** (and a shared expert's gate, and the shared experts' linear layers): vLLM's linear layers, so
  ``F.linear`` and cuBLAS, whose kernel choice follows the number of tokens. The worker gives each of them
  ``BiLinearMethod``: the same layer, its product through ``bi.linear``.
- **the experts**: vLLM's Triton fused-MoE kernel (``TritonExperts``), whose config (tile sizes, warps, stages) vLLM
  picks per call from the number of tokens M: the nearest key of a tuned JSON file, else ``get_default_config``.
  Nothing in that choice keeps a token's sum order: ``BLOCK_SIZE_K`` and the warps change with M (on the H100 and
  H200 the K loop of vLLM's configs for Qwen3-30B-A3B's shape happened to give the same bits at every M,
  benchmarks/moe.py; other shapes, dtypes or compilers need not). With one config for every M each output row is
  one fixed K loop of its own token and expert (no split-K, no atomics), and vLLM's ``moe_sum`` adds a token's
  top-k rows in a fixed order. The config goes in through vLLM's own tuned-config mechanism: a JSON file with a
  single key (the nearest key to any M) per (E, N) under the folder that the plugin pins as
  ``VLLM_TUNED_CONFIG_FOLDER`` (``vllm_checks.MOE_CONFIG_FOLDER``), written by the worker once the model is loaded.
  The experts run on vLLM's Triton backend (the platform selects ``--moe-backend triton``); the FlashInfer ones are
  closed kernels bi-compile cannot pin.

Every MoE layer must fit this, or the worker refuses it by name: unquantized experts on the Triton backend, no
expert parallelism. Each config in ``PINNED_CONFIGS`` is checked for the bits it gives a token alone and inside
batches of every size by ``tests/vllm/test_vllm_gpu.py`` (the MoE route) and measured in ``benchmarks/moe.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

from bi_compile.passes import declare_invariant
from bi_compile.vllm_checks import MOE_CONFIG_FOLDER, RAN, SWITCH, VllmSettingError

# Device name (vLLM's ``get_device_name_as_file_name``, H200s as vLLM names them) -> the one config for every M;
# "default" for any other device. The default is measured on the H100 and H200 with benchmarks/moe.py (docs/vllm.md,
# "MoE"): within 1.05x of vLLM's per-M configs up to M = 1024, 1.4x at M = 4096.
PINNED_CONFIGS = {
    "default": {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 8, "SPLIT_K": 1,
                "num_warps": 4, "num_stages": 3},
}
# The ops a MoE layer is in the graph, and why the audit counts them invariant once every layer is owned.
MOE_OPS = ("vllm::moe_forward", "vllm::moe_forward_shared")
MOE_REASON = ("bi-compile's worker pinned one Triton fused-MoE config for every batch size and routes the gate and "
              "shared experts through bi.linear (bi_compile/vllm_moe.py)")


def pinned_config() -> dict:
    """This device's entry of PINNED_CONFIGS, by the name vLLM gives the device in its config files."""
    from vllm.utils.platform_utils import get_device_name_as_file_name

    name = get_device_name_as_file_name()
    name = "NVIDIA_H200" if "H200" in name.split("_") else name  # as vLLM's get_config_file_name names the family
    return PINNED_CONFIGS.get(name, PINNED_CONFIGS["default"])


class BiLinearMethod(UnquantizedLinearMethod):
    """vLLM's unquantized linear method with the product through ``bi.linear``: for the linear layers that run
    inside the opaque MoE op, where the graph pass cannot reach them."""

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        RAN["moe bi.linear"] += 1
        shape = x.shape
        out = torch.ops.bi.linear(x.reshape(-1, shape[-1]), layer.weight, bias)
        return out.reshape(*shape[:-1], out.shape[-1])


def _inner_linears(runner) -> list[tuple[str, LinearBase]]:
    """The linear layers that run inside the MoE op: the gate, a shared expert's gate, the shared experts' own (all
    submodules of vLLM's MoERunner)."""
    return [(name, m) for name, m in runner.named_modules() if isinstance(m, LinearBase)]


def _refuse(layer: str, why: str) -> VllmSettingError:
    return VllmSettingError(f"{SWITCH}=1: bi-compile cannot make the MoE layer {layer} batch-invariant: {why}")


def own_moe_layers(model: torch.nn.Module) -> list[dict]:
    """Give every MoE layer of ``model`` one fused-MoE config and ``bi.linear`` for its inner linear layers; refuse a
    layer that does not fit. Returns what was done per layer; declares the MoE ops invariant for the audit."""
    from vllm.model_executor.layers.fused_moe.config import _get_config_dtype_str
    from vllm.model_executor.layers.fused_moe.fused_moe import get_config_file_name
    from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    folder = os.environ.get("VLLM_TUNED_CONFIG_FOLDER")
    config = pinned_config()
    owned, written = [], set()
    for name, runner in model.named_modules():
        if not isinstance(runner, MoERunner):
            continue
        experts = runner.routed_experts
        method = experts.quant_method
        if not isinstance(method, UnquantizedFusedMoEMethod):
            raise _refuse(name, f"its experts are quantized ({type(method).__name__}); only unquantized experts "
                                "run on the Triton kernel whose config bi-compile pins")
        if method.unquantized_backend != UnquantizedMoeBackend.TRITON:
            raise _refuse(name, f"its experts run on vLLM's {method.unquantized_backend.value} backend; bi-compile "
                                "pins the TRITON backend's config (--moe-backend triton)")
        if experts.moe_config.moe_parallel_config.use_ep:
            raise _refuse(name, "expert parallelism moves tokens between ranks in an order bi-compile does not fix; "
                                "drop --enable-expert-parallel")
        if folder != MOE_CONFIG_FOLDER:
            raise _refuse(name, f"VLLM_TUNED_CONFIG_FOLDER is {folder!r}, not bi-compile's {MOE_CONFIG_FOLDER!r} (the "
                                "plugin pins it: was the plugin loaded in this process?)")
        linears = _inner_linears(runner)
        for _, layer in linears:
            if type(layer.quant_method) not in (UnquantizedLinearMethod, BiLinearMethod):
                raise _refuse(name, f"a linear layer inside it is quantized ({type(layer.quant_method).__name__})")
            layer.quant_method = BiLinearMethod()
        # With a gate and a shared expert's gate, vLLM concatenates their weights into one F.linear; two bi.linear
        # calls give the same logits.
        runner._fse_fuse_gate = False
        w2 = experts.w2_weight  # [E, K, N]: try_get_optimal_moe_config's E and N
        n_experts, n_inner = w2.shape[0], w2.shape[2]
        path = Path(folder) / get_config_file_name(n_experts, n_inner, _get_config_dtype_str(w2.dtype))
        if path not in written:
            _write_atomically(path, {"1": config})
            written.add(path)
        owned.append({"layer": name, "experts": n_experts, "inner": n_inner, "config_file": str(path),
                      "config": config, "bi_linear": [n for n, _ in linears]})
    if owned:
        for op in MOE_OPS:
            declare_invariant(op, MOE_REASON)
    return owned


def _write_atomically(path: Path, content: dict) -> None:
    """Several engines may start at once and write the same file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(content, indent=1, sort_keys=True))
    os.replace(tmp, path)
