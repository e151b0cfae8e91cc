"""How bi-compile's GPU worker owns vLLM's fused MoE (bi_compile/vllm_moe.py), through vLLM 0.32's own classes and
its own config lookup, probed without a GPU in a child process (moe_probe.py). The bits it gives a token alone and
in batches are the GPU suite's (test_vllm_gpu.py, the MoE routes)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_vllm_plugin import probe_facts


@pytest.fixture(scope="module")
def probe() -> dict:
    return probe_facts("moe_probe.py", timeout_s=600)


def test_vllm_then_runs_one_fused_moe_config_at_every_batch_size(probe):
    configs = list(probe["configs"].values())
    assert all(config == probe["pinned"] for config in configs), probe["configs"]
    # Control: without the file, vLLM's own lookup changes the config (and BLOCK_SIZE_K, the sum order) with M.
    control = probe["control_configs"]
    assert len({config["BLOCK_SIZE_K"] for config in control.values()}) > 1, control


def test_each_moe_layer_is_owned_through_one_file_per_shape(probe):
    owned = probe["owned"]
    assert [layer["layer"] for layer in owned] == ["layers.0", "layers.1"]
    assert all(layer["config"] == probe["pinned"] and Path(layer["config_file"]).name.startswith("E=16,N=48,")
               for layer in owned)
    assert [layer["bi_linear"] for layer in owned] == [["gate"], ["gate", "shared_expert_gate"]]


def test_the_gate_and_shared_gate_run_bi_linear_inside_the_moe_op(probe):
    assert probe["methods"] == ["BiLinearMethod"] * 3 and probe["is_bi_method"]
    assert probe["gate_is_bi_linear"] and probe["gate_row_alone_equals_batched"]
    assert probe["gate_3d_shape"] == [1, 37, 16] and probe["gate_calls_counted"] == 5
    # vLLM's concatenated gate (one F.linear for both gates) is off: the two bi.linear calls replace it.
    assert probe["fse_fuse_gate_after"] == [False, False]


def test_the_audit_counts_the_moe_ops_invariant_only_once_the_layers_are_owned(probe):
    assert probe["declared_before"] == []
    assert all("pinned one Triton fused-MoE config" in why for why in probe["declared_after"].values())


@pytest.mark.parametrize("case, message", [
    ("quantized", "the MoE layer layers.0 batch-invariant: its experts are quantized"),
    ("flashinfer", "its experts run on vLLM's FlashInfer CUTLASS backend; bi-compile pins the TRITON backend"),
    ("expert_parallel", "expert parallelism moves tokens between ranks"),
    ("other_folder", "VLLM_TUNED_CONFIG_FOLDER is '.*', not bi-compile's"),
])
def test_a_moe_layer_that_does_not_fit_is_refused_by_name(probe, case, message):
    assert re.search(message, probe["refused"][case] or ""), probe["refused"][case]


def test_the_platform_selects_the_triton_moe_backend_and_refuses_another_by_name(probe):
    assert probe["auto_backend"] == "triton"
    assert "--moe-backend flashinfer_cutlass would replace it" in probe["named_backend_error"]
