"""Probe, in a fresh process with vLLM imported, the table row for ``vllm.all_reduce``: a one-rank gloo world with
vLLM's own parallel groups, a graph calling the op as vLLM's GroupCoordinator does, the pipeline on it; print the
facts as JSON for test_vllm_all_reduce.py. No engine is built (one rank: vLLM itself would skip the collective)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path


def rewritten(fn, x, *, run: bool = True):
    """(graph module, report, output) of ``fn`` compiled through aot_autograd with the pipeline on its forward graph;
    ``run=False`` stops once the graph is rewritten (output None): a graph that kept vLLM's op would run it."""
    import torch
    from torch._dynamo.backends.common import aot_autograd

    from bi_compile.passes import run_pipeline

    seen = []

    def forward(gm, _inputs):
        seen.append((gm, run_pipeline(gm.graph)))
        gm.recompile()
        if not run:
            raise StopAfterRewrite
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=aot_autograd(fw_compiler=forward, decompositions={}), fullgraph=True)
    try:
        out = compiled(x)
    except torch._dynamo.exc.BackendCompilerFailed as error:
        if not isinstance(error.inner_exception, StopAfterRewrite):
            raise
        out = None
    (gm, report), = seen
    return gm, report, out


class StopAfterRewrite(Exception):
    pass


def main() -> None:
    import torch
    import vllm  # noqa: F401  (first, as in every vLLM process)
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed.parallel_state import get_tp_group, init_distributed_environment, initialize_model_parallel

    import bi_compile  # noqa: F401  (registers torch.ops.bi.*)

    store = Path(tempfile.mkdtemp()) / "store"
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, distributed_init_method=f"file://{store}",
                                     backend="gloo")
        initialize_model_parallel(tensor_model_parallel_size=1)
    tp = get_tp_group()
    facts = {"vllm_group": tp.unique_name, "torch_group": tp.device_group.group_name}

    def tp_out(x):
        return torch.ops.vllm.all_reduce(x * 2, group_name=tp.unique_name) + 1

    x = torch.randn(3, 8)
    gm, report, out = rewritten(tp_out, x)
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target) == "bi.all_reduce.default"]
    facts["rewrites"] = report.rewrites
    facts["bi_group_names"] = [n.kwargs["group_name"] for n in calls]
    facts["output_is_input_doubled_plus_one"] = torch.equal(out[0] if isinstance(out, tuple) else out, x * 2 + 1)

    def unknown_group(x):
        return torch.ops.vllm.all_reduce(x, group_name="tp:999")

    _, report, _ = rewritten(unknown_group, torch.randn(3, 8), run=False)
    facts["unknown_group_rewrites"] = report.rewrites
    facts["unknown_group_findings"] = [(f.target, f.kind, f.source) for f in report.findings]
    print("PROBE " + json.dumps(facts))


if __name__ == "__main__":
    sys.exit(main())
