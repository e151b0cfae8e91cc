"""Run the invariance workloads through vLLM's offline ``LLM`` under one route; write the results as JSON.

    python tests/vllm/llm_runner.py --model DIR --route bi-graph --out result.json [--workload smoke]

A child process per route (the tests start it with a timeout): one vLLM engine per process, and the engine runs
in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so the reports of the graphs it compiled are
``bi_compile.reports()`` right here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from serve import ROUTES  # noqa: E402
from workloads import (LOGPROB_SAMPLING, LOGPROB_SEED, NEEDLE_PROMPT, NEEDLE_SAMPLING, Completion,  # noqa: E402
                       logprob_prompts, needle_trials)


def completion(output) -> Completion:
    """Tokens and the chosen token's logprob at each step of one ``RequestOutput``."""
    sample = output.outputs[0]
    tokens = list(sample.token_ids)
    logprobs = [step[token].logprob.hex() for token, step in zip(tokens, sample.logprobs or [])]
    return Completion(tokens, logprobs)


def run(model: str, route_name: str, workload: str) -> dict:
    route = ROUTES[route_name]
    env = {**route.server_env(), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    os.environ.clear()
    os.environ.update(env)
    from vllm import LLM, SamplingParams

    from bi_compile.passes import reports

    # The same engine settings as the served tests (conftest.SERVER_ARGS).
    llm = LLM(model=model, seed=0, max_model_len=512, max_num_seqs=64, gpu_memory_utilization=0.3,
              max_num_batched_tokens=16384, compilation_config=route.compilation_config)

    def generate(prompts: list[str], seeds: list[int | None], sampling: dict) -> list[Completion]:
        params = [SamplingParams(**sampling, seed=seed) for seed in seeds]
        return [completion(out) for out in llm.generate(prompts, params, use_tqdm=False)]

    if workload == "smoke":  # just enough to compile the model's graph and run it
        generate([NEEDLE_PROMPT], [None], {**NEEDLE_SAMPLING, "max_tokens": 4})
        return {"route": route_name, "reports": [report.to_dict() for report in reports()]}

    needle_alone = generate([NEEDLE_PROMPT], [None], NEEDLE_SAMPLING)[0]
    trials = []
    for trial in needle_trials():
        outputs = generate(trial.prompts, [None] * len(trial.prompts), NEEDLE_SAMPLING)
        trials.append({"batch": len(trial.prompts), "position": trial.position,
                       **outputs[trial.position].to_dict()})

    prompts = logprob_prompts()
    seeds = [LOGPROB_SEED + i for i in range(len(prompts))]
    alone = [generate([p], [s], LOGPROB_SAMPLING)[0] for p, s in zip(prompts, seeds)]
    batched = generate(prompts, seeds, LOGPROB_SAMPLING)
    return {
        "route": route_name,
        "needle": {"alone": needle_alone.to_dict(), "trials": trials},
        "logprobs": {"alone": [c.to_dict() for c in alone], "batched": [c.to_dict() for c in batched]},
        "reports": [report.to_dict() for report in reports()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--route", required=True, choices=list(ROUTES))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--workload", choices=("invariance", "smoke"), default="invariance")
    args = parser.parse_args()
    args.out.write_text(json.dumps(run(args.model, args.route, args.workload)))


if __name__ == "__main__":
    main()
