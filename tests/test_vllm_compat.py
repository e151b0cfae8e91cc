"""Which vLLM bi-compile's vLLM parts take (bi_compile/vllm_compat.py) and the plugin's pins on a GPU
(bi_compile/vllm_plugin.py), without vLLM: versions are strings and vLLM's classes are fakes built from the table, so
each refusal is shown by taking one thing away."""

from __future__ import annotations

import os

import pytest

from bi_compile import vllm_compat, vllm_plugin
from bi_compile.vllm_checks import MOE_CONFIG_FOLDER, VllmSettingError
from bi_compile.vllm_compat import SKIP_CPU_GEMM_DISPATCH, VllmApiError, api_for, check_vllm_api


def fake_vllm(api_release: str, *, drop: tuple[str, ...] = (), cpu_flag: bool = True):
    """A resolver like vllm_compat's, over fakes that have everything the table asks of ``api_release`` except the
    dotted names in ``drop`` (a module, a class or one attribute); ``cpu_flag``: vLLM's CPU weight set-up reads
    the flag that keeps a weight plain (0.32) or not (0.26)."""
    api = next(a for a in vllm_compat.VLLM_APIS if a.release == api_release)
    needs = [*vllm_compat.COMMON, *vllm_compat.CPU, *vllm_compat.GPU, *api.needs,
             *((module, cls, vllm_compat.WORKER_METHODS) for module, cls in vllm_compat.WORKER_BASES.values())]
    owners: dict[tuple[str, str | None], dict] = {}
    for module, name, attrs in needs:
        owners.setdefault((module, name), {}).update({attr: object() for attr in attrs})

    def resolve(module: str, name: str | None):
        where = f"{module}.{name}" if name else module
        if module in drop or where in drop or (module, name) not in owners:
            return None
        attrs = {attr: value for attr, value in owners[module, name].items() if f"{where}.{attr}" not in drop}
        if name == "UnquantizedLinearMethod":  # read by name inside the method, not defined on the class
            flag = SKIP_CPU_GEMM_DISPATCH if cpu_flag else "something_else"
            attrs = {"process_weights_after_loading": eval(f"lambda layer: getattr(layer, {flag!r}, False)")}
        return type(name or module, (), attrs)

    return resolve


@pytest.mark.parametrize("version, release", [("0.26.0", "0.26"), ("0.26.3", "0.26"), ("0.29.1", "0.26"),
                                              ("0.32.0", "0.32"), ("0.32.0+cpu", "0.32"), ("0.32.1rc1", "0.32")])
def test_each_version_is_checked_against_its_release_or_the_newest_older_one(version, release):
    assert api_for(version).release == release


@pytest.mark.parametrize("version", ["0.25.2", "0.33.0", "1.0.0"])
def test_a_version_outside_the_written_range_is_refused_by_version(version):
    with pytest.raises(VllmApiError, match=rf"written against vLLM 0.26 and 0.32 .*take 0.26 to 0.32; this is "
                                           rf"vLLM {version}"):
        api_for(version)


def test_an_unreadable_version_is_refused():
    with pytest.raises(VllmApiError, match="cannot read a vLLM release from the version 'dev'"):
        api_for("dev")


@pytest.mark.parametrize("version, platform", [("0.26.0", "gpu"), ("0.32.0", "cpu"), ("0.32.0", "gpu")],
                         ids=["0.26-on-a-gpu", "0.32-on-a-cpu", "0.32-on-a-gpu"])
def test_a_vllm_with_everything_the_table_names_passes(version, platform):
    release = api_for(version).release
    assert check_vllm_api(platform, version, fake_vllm(release, cpu_flag=release == "0.32")).release == release


def test_each_release_is_checked_for_what_only_it_has():
    """0.26's runner asks the backend for the KV-cache shape; 0.32 resolves the layout itself."""
    with pytest.raises(VllmApiError, match=r"vLLM 0.26.0 lacks vllm.v1.attention.backend.AttentionBackend"
                                           r".get_kv_cache_shape$"):
        check_vllm_api("gpu", "0.26.0",
                       fake_vllm("0.26", drop=("vllm.v1.attention.backend.AttentionBackend.get_kv_cache_shape",)))
    layouts = "vllm.v1.attention.backend.AttentionBackend.supported_kv_cache_layouts"
    with pytest.raises(VllmApiError, match=rf"vLLM 0.32.0 lacks {layouts}$"):
        check_vllm_api("gpu", "0.32.0", fake_vllm("0.32", drop=(layouts,)))
    # Each release's own need is not asked of the other.
    assert check_vllm_api("gpu", "0.26.0", fake_vllm("0.26", drop=(layouts,))).release == "0.26"


@pytest.mark.parametrize("dropped", [
    "vllm.v1.attention.backend.AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE",
    "vllm.v1.sample.sampler.Sampler.compute_logprobs",
    "vllm.model_executor.layers.logits_processor.LogitsProcessor._apply_head",
    "vllm.v1.worker.gpu_worker.Worker.init_device",
    "vllm.v1.sample.ops.topk_topp_sampler",  # a whole module
    "vllm.model_executor.layers.fused_moe.runner.moe_runner.MoERunner._fse_fuse_gate",
    "vllm.model_executor.layers.fused_moe.fused_moe.get_config_file_name",
])
def test_what_a_vllm_lacks_is_refused_by_name(dropped):
    with pytest.raises(VllmApiError, match=rf"written against vLLM 0.26's classes .*lacks {dropped}"):
        check_vllm_api("gpu", "0.26.0", fake_vllm("0.26", drop=(dropped,)))


def test_a_cpu_is_taken_only_where_vllm_keeps_linear_weights_plain():
    with pytest.raises(VllmApiError, match=r"taken on cpu from vLLM 0.32 \(VLLM_APIS\); this is vLLM 0.26.0"):
        check_vllm_api("cpu", "0.26.0", fake_vllm("0.26", cpu_flag=False))
    with pytest.raises(VllmApiError, match=rf"lacks vllm.model_executor.layers.linear.UnquantizedLinearMethod."
                                           rf"{SKIP_CPU_GEMM_DISPATCH}$"):
        check_vllm_api("cpu", "0.32.0", fake_vllm("0.32", cpu_flag=False))
    # A GPU does not need the flag, and a CPU does not need what the GPU worker reads of the fused MoE.
    assert check_vllm_api("gpu", "0.32.0", fake_vllm("0.32", cpu_flag=False)).release == "0.32"
    moe = "vllm.model_executor.layers.fused_moe.runner.moe_runner.MoERunner"
    assert check_vllm_api("cpu", "0.32.0", fake_vllm("0.32", drop=(moe,))).release == "0.32"


# ---- the plugin's pins ----


@pytest.fixture
def environ(monkeypatch) -> dict[str, str]:
    """os.environ as the pins see it, without any pinned variable; the real one is untouched."""
    pinned = {pin.name for pin in vllm_plugin.ENV_PINS}
    fake = {name: value for name, value in os.environ.items() if name not in pinned}
    monkeypatch.setattr(os, "environ", fake)
    return fake


def test_on_a_gpu_the_plugin_no_longer_hands_anything_to_vllms_batch_invariant_mode(environ):
    assert not [pin for pin in vllm_plugin.ENV_PINS if pin.name == "VLLM_BATCH_INVARIANT" and pin.value != "0"]
    vllm_plugin.pin_environment("gpu")
    assert environ["VLLM_BATCH_INVARIANT"] == "0"
    # What bi-compile does not own stays pinned: the V1 model runner (its sampler is the one the worker swaps),
    # breakable CUDA graphs off, vLLM's symmetric-memory all-reduce off, NCCL to one algorithm, protocol, channel.
    assert {name: environ[name] for name in ("VLLM_USE_V2_MODEL_RUNNER", "VLLM_USE_BREAKABLE_CUDAGRAPH",
                                             "VLLM_ALLREDUCE_USE_SYMM_MEM", "NCCL_ALGO", "NCCL_PROTO",
                                             "NCCL_MIN_NCHANNELS", "NCCL_MAX_NCHANNELS")} == {
        "VLLM_USE_V2_MODEL_RUNNER": "0", "VLLM_USE_BREAKABLE_CUDAGRAPH": "0", "VLLM_ALLREDUCE_USE_SYMM_MEM": "0",
        "NCCL_ALGO": "allreduce:tree", "NCCL_PROTO": "Simple", "NCCL_MIN_NCHANNELS": "1", "NCCL_MAX_NCHANNELS": "1"}
    # vLLM's fused MoE reads its tuned configs from bi-compile's folder (one config for every batch size).
    assert environ["VLLM_TUNED_CONFIG_FOLDER"] == MOE_CONFIG_FOLDER
    assert "CUBLAS_WORKSPACE_CONFIG" not in {pin.name for pin in vllm_plugin.ENV_PINS}  # nothing left for cuBLAS
    assert all(pin.why for pin in vllm_plugin.ENV_PINS)


def test_a_tuned_moe_config_folder_of_the_users_own_is_refused_by_name_on_a_gpu(environ):
    environ["VLLM_TUNED_CONFIG_FOLDER"] = "/my/tuned"
    with pytest.raises(VllmSettingError, match=r"VLLM_TUNED_CONFIG_FOLDER=/my/tuned \(needs .*bi-compile-moe-configs"
                                               r".*: vLLM's fused MoE picks a Triton config per batch size"):
        vllm_plugin.pin_environment("gpu")


def test_on_a_cpu_the_gpu_pins_stay_unset(environ):
    set_now = {pin.name for pin in vllm_plugin.pin_environment("cpu")}
    assert set_now == {"VLLM_USE_AOT_COMPILE", "VLLM_BATCH_INVARIANT", "VLLM_USE_V2_MODEL_RUNNER"}
    assert "NCCL_ALGO" not in environ


@pytest.mark.parametrize("platform", ["gpu", "cpu"], ids=["on-a-gpu", "on-a-cpu"])  # a "gpu" id would mark it gpu
def test_vllm_batch_invariant_together_with_the_switch_is_refused_by_name(platform, environ):
    environ["VLLM_BATCH_INVARIANT"] = "1"
    with pytest.raises(VllmSettingError, match=r"VLLM_BATCH_INVARIANT=1 \(needs 0: vLLM's own batch-invariant "
                                               r"mode would take the linear layers"):
        vllm_plugin.pin_environment(platform)
    assert "VLLM_USE_AOT_COMPILE" not in environ  # refused before anything was set


def test_control_a_user_value_equal_to_a_pin_is_kept(environ):
    environ.update({"VLLM_BATCH_INVARIANT": "0", "NCCL_PROTO": "Simple"})
    set_now = {pin.name for pin in vllm_plugin.pin_environment("gpu")}
    assert "VLLM_BATCH_INVARIANT" not in set_now and "NCCL_PROTO" not in set_now and "NCCL_ALGO" in set_now


def test_the_fakes_are_real_enough_to_fail():
    """Control: the fake resolver does take things away (a fake that kept them would pass every refusal above)."""
    resolve = fake_vllm("0.26", drop=("vllm.v1.sample.sampler.Sampler.sample",))
    assert not hasattr(resolve("vllm.v1.sample.sampler", "Sampler"), "sample")
    assert hasattr(resolve("vllm.v1.sample.sampler", "Sampler"), "compute_logprobs")
