"""Run the invariance workloads through vLLM's offline ``LLM`` under one route; write the results as JSON.

    python tests/vllm/llm_runner.py --model DIR --route bi-graph --out result.json \
        [--engine cpu|gpu] [--workloads invariance sampled chunked | smoke | profile]

A child process per route (the tests start it with a timeout): one vLLM engine per process, and the engine runs
in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so the reports of the graphs it compiled are
``bi_compile.reports()`` right here, and so are the CUDA graphs it captured and replayed (counted on
``torch.cuda.CUDAGraph``, which vLLM's graph runners all use). The result also records what vLLM really ran:
its compilation mode and CUDA-graph mode after its own config checks, the attention backend of every layer, the
batch-invariance switches as the engine saw them, and how often bi-compile's attention, lm_head and sampler ran.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from serve import ROUTES  # noqa: E402
from workloads import (CHUNK_TOKENS, LOGPROB_SAMPLING, LOGPROB_SEED, NEEDLE_PROMPT, NEEDLE_SAMPLING,  # noqa: E402
                       SAMPLED_SAMPLING, SAMPLED_SEED, Completion, chunked_prompts, logprob_prompts, needle_trials,
                       sampled_prompts)

# Engine settings per machine. cpu: what the CI tests and servers use (room for a whole batch's prompts in one step,
# see conftest.MAX_BATCHED_TOKENS). gpu: Qwen3-0.6B shapes, prefill chunks of CHUNK_TOKENS, and a fixed KV-cache size
# instead of a share of free memory, so that several engines can start side by side on one GPU (vLLM's memory
# profiling refuses to start when another process frees memory meanwhile).
ENGINES = {
    "cpu": dict(max_model_len=512, max_num_seqs=64, gpu_memory_utilization=0.3, max_num_batched_tokens=16384),
    "gpu": dict(max_model_len=2048, max_num_seqs=64, gpu_memory_utilization=0.1, kv_cache_memory_bytes=4 << 30,
                max_num_batched_tokens=CHUNK_TOKENS),
}
WORKLOADS = ("invariance", "sampled", "chunked", "smoke", "profile")
# The profile workload: where a step's GPU time goes, kernel by kernel (torch.profiler, CUDA graph replays
# included), for PROFILE_BATCH requests decoding PROFILE_TOKENS tokens each at temperature 1; run once untimed first
# (Triton compiles), then profiled.
PROFILE_BATCH, PROFILE_TOKENS = 8, 64
SWITCHES = ("BI_COMPILE_VLLM", "VLLM_BATCH_INVARIANT", "VLLM_USE_V2_MODEL_RUNNER", "VLLM_USE_BREAKABLE_CUDAGRAPH",
            "VLLM_USE_AOT_COMPILE")


class GraphCounter:
    """Counts CUDA-graph captures and replays in this process (vLLM's runners capture through torch.cuda.graph)."""

    def __init__(self):
        self.counts = Counter()
        try:
            import torch
        except ImportError:
            return
        graph_class = torch.cuda.CUDAGraph
        for method in ("capture_end", "replay"):
            original = getattr(graph_class, method)

            def counted(graph, *args, _original=original, _method=method, **kwargs):
                self.counts[_method] += 1
                return _original(graph, *args, **kwargs)

            setattr(graph_class, method, counted)

    def snapshot(self) -> dict[str, int]:
        return {"captures": self.counts["capture_end"], "replays": self.counts["replay"]}


def attention_backends(worker) -> list[str]:
    """The attention backend of every attention layer the worker built (run through ``LLM.collective_rpc``)."""
    context = worker.vllm_config.compilation_config.static_forward_context
    return sorted({layer.get_attn_backend().get_name() for layer in context.values()
                   if hasattr(layer, "get_attn_backend")})


def bi_calls(worker) -> dict[str, int]:
    """How often each of bi-compile's vLLM pieces ran in the worker: attention, lm_head, sampler (through
    ``LLM.collective_rpc``; the counts live in ``bi_compile.vllm_checks.RAN``)."""
    from bi_compile.vllm_checks import RAN

    return dict(RAN)


def moe_layers(worker) -> list[dict] | None:
    """What bi-compile's GPU worker did to each fused-MoE layer (bi_compile/vllm_moe.py), or None without it."""
    return getattr(worker, "bi_moe_layers", None)


def profile_steps(run) -> dict:
    """``run()`` once untimed, then under torch.profiler: the kernels by their own device time (ops by CPU time on a
    machine without CUDA), summed over the run, and the wall time of the profiled run. On a GPU only the device's
    own events count: an operator's row (``aten::mm``, ``bi::linear``) holds its kernels' time a second time."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        def own_time(e):
            return e.self_device_time_total if e.device_type == DeviceType.CUDA else 0
    else:
        def own_time(e):
            return e.self_cpu_time_total
    run()
    sync()
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        run()
        sync()
    wall_s = time.perf_counter() - started
    events = sorted((e for e in prof.key_averages() if own_time(e) > 0), key=own_time, reverse=True)
    return {"wall_s": round(wall_s, 3), "device": "GPU" if cuda else "CPU", "decode_steps": PROFILE_TOKENS,
            "total_us": round(sum(own_time(e) for e in events)),
            "kernels": [{"name": e.key[:120], "calls": e.count, "us": round(own_time(e))} for e in events]}


def recorded(read):
    """A fact about the engine, or the error that reading it raised: the invariance results must survive a vLLM
    version that moved the attribute (the tests assert on the fact and show the error)."""
    try:
        return read()
    except Exception as error:  # noqa: BLE001
        return f"unreadable: {error!r}"


def completion(output) -> Completion:
    """Tokens and the chosen token's logprob at each step of one ``RequestOutput``."""
    sample = output.outputs[0]
    tokens = list(sample.token_ids)
    logprobs = [step[token].logprob.hex() for token, step in zip(tokens, sample.logprobs or [])]
    return Completion(tokens, logprobs)


def run(model: str, route_name: str, engine: str, workloads: list[str]) -> dict:
    route = ROUTES[route_name]
    env = {**route.server_env(), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    os.environ.clear()
    os.environ.update(env)
    graphs = GraphCounter()
    import vllm
    from vllm import LLM, SamplingParams

    from bi_compile.passes import reports

    started = time.perf_counter()
    llm = LLM(model=model, seed=0, compilation_config=route.compilation_config, **ENGINES[engine])
    compilation = llm.llm_engine.vllm_config.compilation_config
    result = {
        "route": route_name, "engine": engine, "vllm": vllm.__version__,
        "init_s": round(time.perf_counter() - started, 1),
        "compilation": {"mode": getattr(compilation.mode, "name", str(compilation.mode)),
                        "backend": compilation.backend, "cudagraph_mode": str(compilation.cudagraph_mode)},
        "attention_backends": recorded(lambda: llm.collective_rpc(attention_backends)[0]),
        "switches": {name: os.environ.get(name) for name in SWITCHES},
        "cuda_graphs_at_start": graphs.snapshot(),
        "generate_s": {},
    }

    def generate(prompts: list[str], seeds: list[int | None], sampling: dict) -> list[Completion]:
        params = [SamplingParams(**sampling, seed=seed) for seed in seeds]
        return [completion(out) for out in llm.generate(prompts, params, use_tqdm=False)]

    def alone_and_batched(prompts: list[str], sampling: dict = LOGPROB_SAMPLING, seed: int = LOGPROB_SEED) -> dict:
        seeds = [seed + i for i in range(len(prompts))]
        alone = [generate([p], [s], sampling)[0] for p, s in zip(prompts, seeds)]
        batched = generate(prompts, seeds, sampling)
        return {"alone": [c.to_dict() for c in alone], "batched": [c.to_dict() for c in batched]}

    for workload in workloads:
        started = time.perf_counter()
        if workload == "smoke":  # just enough to compile the model's graph and run it
            generate([NEEDLE_PROMPT], [None], {**NEEDLE_SAMPLING, "max_tokens": 4})
        elif workload == "profile":
            result["profile"] = profile_steps(lambda: generate(
                logprob_prompts()[:PROFILE_BATCH], [None] * PROFILE_BATCH,
                {"temperature": 1.0, "max_tokens": PROFILE_TOKENS, "ignore_eos": True}))
        elif workload == "invariance":
            needle_alone = generate([NEEDLE_PROMPT], [None], NEEDLE_SAMPLING)[0]
            trials = []
            for trial in needle_trials():
                outputs = generate(trial.prompts, [None] * len(trial.prompts), NEEDLE_SAMPLING)
                trials.append({"batch": len(trial.prompts), "position": trial.position,
                               **outputs[trial.position].to_dict()})
            result["needle"] = {"alone": needle_alone.to_dict(), "trials": trials}
            result["logprobs"] = alone_and_batched(logprob_prompts())
        elif workload == "sampled":
            result["sampled"] = alone_and_batched(sampled_prompts(), SAMPLED_SAMPLING, SAMPLED_SEED)
        else:
            prompts = chunked_prompts()
            result["chunked"] = alone_and_batched(prompts)
            tokenizer = llm.get_tokenizer()
            result["chunked"]["prompt_tokens"] = [len(tokenizer(p).input_ids) for p in prompts]
        result["generate_s"][workload] = round(time.perf_counter() - started, 2)
    result["cuda_graphs"] = graphs.snapshot()
    result["bi_calls"] = recorded(lambda: llm.collective_rpc(bi_calls)[0])
    result["moe_layers"] = recorded(lambda: llm.collective_rpc(moe_layers)[0])
    result["reports"] = [report.to_dict() for report in reports()]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--route", required=True, choices=list(ROUTES))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--engine", choices=list(ENGINES), default="cpu")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=["invariance"])
    args = parser.parse_args()
    args.out.write_text(json.dumps(run(args.model, args.route, args.engine, args.workloads)))


if __name__ == "__main__":
    main()
