"""The ``bi_ascend`` torch.compile backend: Dynamo's graph -> ATen -> the batch-invariance pipeline -> code.

    torch.compile(model, backend="bi_ascend", dynamic=True, options={"strict": True})

Two inner compilers:

- ``"inductor"`` (default): Inductor with a decomposition table that keeps every op the pipeline rewrites whole
  (no mm, softmax or sum is turned into pointwise loops before the pass sees it), the pipeline installed as
  ``post_grad_custom_pre_pass``, and Inductor's own ``batch_invariant`` / ``deterministic`` switches on where the
  torch version has them (2.13 does, 2.11 does not), plus ``emulate_precision_casts``. Inductor still fuses the
  pointwise code around the bi ops.
  ``cudagraphs=True`` (or ``mode="reduce-overhead"``) captures the compiled graph with Inductor's CUDA-graph trees.
- ``"eager"``: aot_autograd's functionalized ATen graph, rewritten, run op by op with no code generation — the
  shape of Ascend's aclgraph path, and the way to debug a rewrite.

For the FULL_DECODE_ONLY shape of use, compile the decode step and capture it yourself (docs/guide.md shows how):
the bi ops allocate nothing data-dependent and pick their kernel config from the real batch at run time, so one
symbolic-batch compile serves every batch size and every captured graph.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._inductor import config as inductor_config
from torch._inductor.compile_fx import compile_fx
from torch._inductor.decomposition import select_decomp_table
from torch._inductor.fx_passes.post_grad import view_to_reshape

import bi_compile.ops  # noqa: F401  (registers torch.ops.bi.*)
from bi_compile.passes import BatchInvariantPass, decompositions_keeping_rewritten_ops, reports
from bi_compile.report_cache import graph_key, replay_reports, save_reports
from bi_compile.vllm_checks import check_running_vllm

INNER_COMPILERS = ("inductor", "eager")
MODES = {"default": {}, "reduce-overhead": {"cudagraphs": True}}


class BackendOptionError(ValueError):
    pass


@dataclass(frozen=True)
class BackendOptions:
    inner: str = "inductor"  # "inductor" | "eager"
    strict: bool = False  # raise on any node left variant or unknown, instead of warning
    cudagraphs: bool = False  # Inductor's CUDA-graph trees around the compiled graph
    # Inductor emits the launches of the bi kernels that allow it itself, with no op call (passes/native_launch.py).
    # Not under its CUDA-graph trees: a replay pays no host time to save, and the trees refuse a graph whose
    # launches sit behind the ``cond`` that picks the matmul's tiles. Off by default until the GPU tests of
    # tests/test_native_launch.py have passed (docs/benchmarks.md, "GPU test suite").
    native_launch: bool = False

    @property
    def launches_natively(self) -> bool:
        """Whether the pipeline hands kernel launches to Inductor (``native_launch``, where it applies)."""
        return self.native_launch and self.inner == "inductor" and not self.cudagraphs

    @classmethod
    def parse(cls, options: dict | None, mode: str | None = None) -> BackendOptions:
        if mode not in (None, *MODES):
            raise BackendOptionError(f"bi_ascend: unsupported mode {mode!r} (supported: {', '.join(MODES)})")
        options = {**MODES.get(mode or "default", {}), **(options or {})}
        known = {f.name: f.type for f in fields(cls)}
        for key, value in options.items():
            if key not in known:
                raise BackendOptionError(f"bi_ascend: unknown option {key!r} (options: {', '.join(known)})")
            if key != "inner" and not isinstance(value, bool):
                raise BackendOptionError(f"bi_ascend: option {key!r} must be True or False, got {value!r}")
        parsed = cls(**options)
        if parsed.inner not in INNER_COMPILERS:
            raise BackendOptionError(f"bi_ascend: option 'inner' must be one of {INNER_COMPILERS}, got {parsed.inner!r}")
        if parsed.cudagraphs and parsed.inner != "inductor":
            raise BackendOptionError("bi_ascend: cudagraphs=True needs inner='inductor'; "
                                     "with inner='eager' capture the compiled step with torch.cuda.graph")
        return parsed


# batch_invariant / deterministic: Inductor's own switches (torch 2.13 has them, 2.11 not). emulate_precision_casts:
# round bf16/fp16 intermediates where eager does, so pointwise bits do not depend on how Inductor fused them for
# one graph or another (Dynamo compiles batch 1 and the symbolic batch as two graphs).
INDUCTOR_SWITCHES = ("batch_invariant", "deterministic", "emulate_precision_casts")


def inductor_invariance_switches() -> dict[str, bool]:
    return {name: True for name in INDUCTOR_SWITCHES if hasattr(inductor_config, name)}


class InductorDecompositions(dict):
    """Inductor's decomposition table less the ops the pipeline rewrites. torch 2.13 puts the table in the FX graph
    cache key, and some entries are C++ functions that do not pickle (the cache is then bypassed on every compile).
    It pickles as the call that rebuilds it: its contents follow from the torch version, Inductor's config and the
    pipeline's source, and the key holds all three already (the last through ``BatchInvariantPass.uuid()``)."""

    def __reduce__(self):
        return inductor_decompositions, ()


def inductor_decompositions() -> InductorDecompositions:
    return InductorDecompositions(decompositions_keeping_rewritten_ops(select_decomp_table()))


def bi_ascend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    opts = BackendOptions.parse(options, mode)
    check_running_vllm()  # vLLM's whole-graph route: refuse engine settings that break invariance (else a no-op)
    pipeline = BatchInvariantPass(strict=opts.strict, native_launch=opts.launches_natively)
    if opts.inner == "eager":
        def rewrite_and_run(graph_module, _inputs):
            pipeline(graph_module.graph)
            # A bi op may lay out its output otherwise than the op it replaced (SDPA's output is a transposed view,
            # bi.attention's contiguous): views traced against the old strides become reshapes, as Inductor does.
            view_to_reshape(graph_module)
            graph_module.recompile()
            return graph_module

        # No decompositions: aot_autograd only functionalizes, so every op reaches the pipeline whole.
        return aot_autograd(fw_compiler=rewrite_and_run, bw_compiler=rewrite_and_run, decompositions={})(gm, example_inputs)
    switches = inductor_invariance_switches()
    patches = {"post_grad_custom_pre_pass": pipeline, "triton.cudagraphs": opts.cudagraphs, **switches}
    key = graph_key(gm, example_inputs, opts, switches)  # before Inductor changes gm
    graphs_before = len(reports())
    compiled = compile_fx(gm, example_inputs, config_patches=patches,
                          decompositions=inductor_decompositions())
    if len(reports()) > graphs_before:
        save_reports(key, reports()[graphs_before:])
    else:  # a cache hit: Inductor ran no passes
        replay_reports(key, strict=opts.strict)
    return compiled


# After `pip install` the torch_dynamo_backends entry point provides the name; from a source tree, this does.
if "bi_ascend" not in torch._dynamo.list_backends(exclude_tags=()):
    torch._dynamo.register_backend(bi_ascend, name="bi_ascend")
