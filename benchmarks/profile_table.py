"""The kernels of profiled vLLM runs (``tests/vllm/llm_runner.py --workloads profile``) as Markdown: the routes side by
side by kind of kernel, then one table per route of its top kernels: where a step's GPU time goes, and how a bi
route's differs from stock vLLM's.

    python benchmarks/profile_table.py out/profile-stock.json out/profile-bi-graph.json
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

TOP_KERNELS = 25
# Kind of kernel -> the names it covers, stock vLLM's (cuBLAS, FlashAttention, vLLM's CUDA ops, Inductor's fused
# kernels) and bi-compile's; the first match wins, the rest is "other".
KINDS = (
    ("matmul", r"_matmul_kernel|nvjet|gemm|splitKreduce|cutlass.*(gemm|Gemm)"),
    ("attention", r"attention|FlashAttn|flash_fwd|_merge_splits"),
    ("KV-cache write", r"kv_cache|reshape_and_cache|index_put|index_elementwise"),
    ("norm", r"rms_norm|layer_norm"),
)


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if re.search(pattern, name)), "other")


def kinds_table(results: list[dict]) -> str:
    """GPU µs per decode step by kind of kernel, one column per route."""
    per_route = []
    for result in results:
        profile = result["profile"]
        totals = dict.fromkeys([kind for kind, _ in KINDS] + ["other"], 0.0)
        for kernel in profile["kernels"]:
            totals[kind_of(kernel["name"])] += kernel["us"] / profile["decode_steps"]
        totals["all"] = profile["total_us"] / profile["decode_steps"]
        per_route.append(totals)
    lines = ["| kernels, µs per decode step | " + " | ".join(r["route"] for r in results) + " |",
             "|---|" + "---:|" * len(results)]
    lines += [f"| {kind} | " + " | ".join(f"{totals[kind]:.0f}" for totals in per_route) + " |"
              for kind in per_route[0]]
    return "\n".join(lines) + "\n"


def route_table(result: dict) -> str:
    profile = result["profile"]
    steps, device = profile["decode_steps"], profile["device"]
    lines = [f"### {result['route']} ({result['compilation']['mode']}, {result['compilation']['cudagraph_mode']}, "
             f"attention {', '.join(result['attention_backends'])})", "",
             f"profiled run {profile['wall_s'] * 1e3:.0f} ms wall, {profile['total_us'] / 1e3:.1f} ms {device} time in "
             f"kernels, {profile['total_us'] / steps:.0f} µs per decode step ({steps} steps, prefill included)", "",
             f"| kernel | calls | {device} µs | µs per step |", "|---|---:|---:|---:|"]
    lines += [f"| `{k['name']}` | {k['calls']} | {k['us']} | {k['us'] / steps:.1f} |"
              for k in profile["kernels"][:TOP_KERNELS]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="llm_runner JSON results with a profile")
    args = parser.parse_args(argv)
    results = [json.loads(path.read_text()) for path in args.results]
    print(kinds_table(results))
    for result in results:
        print(route_table(result))


if __name__ == "__main__":
    main()
