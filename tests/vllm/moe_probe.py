"""Probe, in a fresh process with vLLM imported, how bi-compile's GPU worker owns vLLM's fused-MoE layers
(bi_compile/vllm_moe.py) through vLLM 0.32's own classes and config lookup, without a GPU or an engine; print the
facts as JSON for test_vllm_moe.py.

The MoE layers are vLLM's ``MoERunner`` objects with their parts set by hand (a real ``ReplicatedLinear`` gate, an
``UnquantizedFusedMoEMethod`` on a named backend, expert weights of a given shape): what ``own_moe_layers`` reads.
The config facts go through vLLM's own ``try_get_optimal_moe_config``, the function its Triton experts call.
"""

from __future__ import annotations

import json
import os
import tempfile
import types

import torch

E, K, N, TOP_K = 16, 64, 48, 4
BATCH_SIZES = (1, 2, 3, 8, 64, 65, 512, 4096)


def moe_runner(backend=None, quantized: bool = False, use_ep: bool = False, shared_gate: bool = False):
    """A vLLM MoERunner holding what own_moe_layers reads: gate, shared-expert gate, experts' method and weights."""
    from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
    from vllm.model_executor.layers.linear import ReplicatedLinear

    method = object() if quantized else object.__new__(UnquantizedFusedMoEMethod)
    if not quantized:
        method.unquantized_backend = backend or UnquantizedMoeBackend.TRITON
    runner = object.__new__(MoERunner)
    torch.nn.Module.__init__(runner)
    runner.gate = ReplicatedLinear(K, E, bias=False, params_dtype=torch.float32, prefix="gate")
    runner.shared_expert_gate = (ReplicatedLinear(K, 1, bias=False, params_dtype=torch.float32, prefix="sg")
                                 if shared_gate else None)
    # vLLM allocates the weights with torch.empty: memory that may hold NaN, which no bitwise comparison survives.
    for gate in (runner.gate, runner.shared_expert_gate):
        if gate is not None:
            with torch.no_grad():
                gate.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(E))
    runner._shared_experts = None
    runner._fse_fuse_gate = shared_gate
    runner.routed_experts = types.SimpleNamespace(
        quant_method=method, w2_weight=torch.empty(E, K, N, dtype=torch.bfloat16),
        moe_config=types.SimpleNamespace(moe_parallel_config=types.SimpleNamespace(use_ep=use_ep)))
    return runner


def model_of(*runners) -> torch.nn.Module:
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList(runners)
    return model


def configs_by_batch_size() -> dict[int, dict]:
    """What vLLM's Triton experts would run at each M for a bf16 layer of this shape (its own lookup, fresh)."""
    from vllm.model_executor.layers.fused_moe.fused_moe import get_moe_configs, try_get_optimal_moe_config

    get_moe_configs.cache_clear()
    return {m: try_get_optimal_moe_config((E, 2 * N, K), (E, K, N), TOP_K, None, m) for m in BATCH_SIZES}


def refusal(fn) -> str | None:
    try:
        fn()
    except Exception as error:  # noqa: BLE001
        return f"{type(error).__name__}: {error}"
    return None


def own_facts(facts: dict) -> None:
    from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend

    from bi_compile import vllm_moe
    from bi_compile.passes.audit import _DECLARED
    from bi_compile.vllm_checks import RAN
    from bi_compile.vllm_moe import MOE_OPS, BiLinearMethod, own_moe_layers, pinned_config

    # The plugin's folder, moved to a fresh one for the probe (as the plugin would pin it).
    vllm_moe.MOE_CONFIG_FOLDER = os.environ["VLLM_TUNED_CONFIG_FOLDER"] = tempfile.mkdtemp()
    facts["control_configs"] = {m: c for m, c in configs_by_batch_size().items()}  # nothing written yet
    facts["declared_before"] = [op for op in MOE_OPS if op in _DECLARED]

    runners = [moe_runner(), moe_runner(shared_gate=True)]
    owned = own_moe_layers(model_of(*runners))
    facts["owned"] = owned
    facts["configs"] = configs_by_batch_size()
    facts["pinned"] = pinned_config()
    facts["declared_after"] = {op: _DECLARED.get(op) for op in MOE_OPS}
    facts["methods"] = [type(layer.quant_method).__name__ for r in runners for layer in (r.gate, r.shared_expert_gate)
                        if layer is not None]
    facts["fse_fuse_gate_after"] = [r._fse_fuse_gate for r in runners]

    # The gate, as the MoE op calls it: bi.linear's bits, whatever the batch; 2-D and 3-D inputs.
    gate = runners[0].gate
    x = torch.randn(37, K)
    before = RAN["moe bi.linear"]
    out, _ = gate(x)
    facts["gate_is_bi_linear"] = torch.equal(out, torch.ops.bi.linear(x, gate.weight, None))
    facts["gate_row_alone_equals_batched"] = all(torch.equal(gate(x[i:i + 1])[0][0], out[i]) for i in (0, 17, 36))
    facts["gate_3d_shape"] = list(gate(x.reshape(1, 37, K))[0].shape)
    facts["gate_calls_counted"] = RAN["moe bi.linear"] - before
    facts["is_bi_method"] = isinstance(gate.quant_method, BiLinearMethod)

    facts["refused"] = {
        "quantized": refusal(lambda: own_moe_layers(model_of(moe_runner(quantized=True)))),
        "flashinfer": refusal(lambda: own_moe_layers(model_of(
            moe_runner(backend=UnquantizedMoeBackend.FLASHINFER_CUTLASS)))),
        "expert_parallel": refusal(lambda: own_moe_layers(model_of(moe_runner(use_ep=True)))),
    }
    os.environ["VLLM_TUNED_CONFIG_FOLDER"] = tempfile.mkdtemp()
    facts["refused"]["other_folder"] = refusal(lambda: own_moe_layers(model_of(moe_runner())))


def platform_facts(facts: dict) -> None:
    from bi_compile import vllm_platform

    auto = types.SimpleNamespace(moe_backend="auto")
    vllm_platform.select_moe_backend(auto)
    facts["auto_backend"] = auto.moe_backend
    facts["named_backend_error"] = refusal(
        lambda: vllm_platform.select_moe_backend(types.SimpleNamespace(moe_backend="flashinfer_cutlass")))


def main() -> None:
    import vllm  # noqa: F401  (first, as in every vLLM process)
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed.parallel_state import init_distributed_environment, initialize_model_parallel

    import bi_compile.ops  # noqa: F401

    torch.manual_seed(0)
    torch.set_num_threads(2)
    facts: dict = {}
    with set_current_vllm_config(VllmConfig()):  # vLLM's layers read it when built
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"file://{tempfile.mkdtemp()}/store")
        initialize_model_parallel(tensor_model_parallel_size=1)
        own_facts(facts)
        platform_facts(facts)
    print("PROBE " + json.dumps(facts))


if __name__ == "__main__":
    main()
