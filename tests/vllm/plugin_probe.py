"""Probe, in a fresh process with vLLM imported first (as in a vLLM process), how vLLM takes bi-compile's pass and
what the plugin does; print the facts as JSON for test_vllm_plugin.py. No engine is built.

The plugin's steps run in the order a vLLM process sees them: switched off, then a conflicting setting, then on.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

PINNED = ("VLLM_USE_AOT_COMPILE", "VLLM_BATCH_INVARIANT", "VLLM_USE_V2_MODEL_RUNNER")


def main() -> None:
    for name in ("BI_COMPILE_VLLM", *PINNED):
        os.environ.pop(name, None)
    import vllm  # noqa: F401  (first, as in every vLLM process)
    from serve import PIECEWISE
    from torch._inductor import config as inductor_config
    from vllm.compilation.passes.inductor_pass import InductorPass
    from vllm.config import AttentionConfig, CompilationConfig, VllmConfig
    from vllm.config.compilation import PassConfig

    from bi_compile import vllm_checks, vllm_plugin
    from bi_compile.passes import BatchInvariantPass

    facts = {}
    resolved = CompilationConfig(**PIECEWISE).inductor_compile_config["post_grad_custom_post_pass"]
    facts["resolved_class"] = type(resolved).__name__
    facts["resolved_is_vllm_inductor_pass"] = isinstance(resolved, InductorPass)
    facts["resolved_is_pipeline"] = isinstance(resolved, BatchInvariantPass)
    facts["resolved_uuid_is_pipeline_uuid"] = resolved.uuid() == BatchInvariantPass().uuid()
    facts["pickle_round_trip_class"] = type(pickle.loads(pickle.dumps(resolved))).__name__

    vllm_plugin.register()
    facts["off_pins_set"] = [name for name in PINNED if name in os.environ]
    facts["off_pre_pass"] = repr(inductor_config.post_grad_custom_pre_pass)

    os.environ.update({"BI_COMPILE_VLLM": "1", "VLLM_USE_AOT_COMPILE": "1"})
    try:
        vllm_plugin.register()
        facts["conflict_error"] = None
    except vllm_checks.VllmSettingError as error:
        facts["conflict_error"] = str(error)
    del os.environ["VLLM_USE_AOT_COMPILE"]
    os.environ["VLLM_BATCH_INVARIANT"] = "1"  # vLLM's own mode beside bi-compile's: refused, not mixed
    try:
        vllm_plugin.register()
        facts["batch_invariant_error"] = None
    except vllm_checks.VllmSettingError as error:
        facts["batch_invariant_error"] = str(error)
    del os.environ["VLLM_BATCH_INVARIANT"]

    vllm_plugin.register()
    facts["on_pins"] = {name: os.environ.get(name) for name in PINNED}
    facts["on_pre_pass"] = type(inductor_config.post_grad_custom_pre_pass).__name__

    breaking = VllmConfig(attention_config=AttentionConfig(backend="FLASHINFER"),
                          compilation_config=CompilationConfig(mode=2, backend="eager",
                                                               pass_config=PassConfig(fuse_allreduce_rms=True)))
    facts["breaking_config_problems"] = vllm_checks.check_vllm_config(breaking)
    facts["default_config_problems"] = vllm_checks.check_vllm_config(VllmConfig())
    print("PROBE " + json.dumps(facts))


if __name__ == "__main__":
    main()
