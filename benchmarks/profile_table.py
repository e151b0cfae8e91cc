"""The kernels of profiled vLLM runs (``tests/vllm/llm_runner.py --workloads profile``) as Markdown, one table per
route: where a step's GPU time goes, and how a bi route's differs from stock vLLM's.

    python benchmarks/profile_table.py out/profile-stock.json out/profile-bi-graph.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def route_table(result: dict) -> str:
    profile = result["profile"]
    steps, device = profile["decode_steps"], profile["device"]
    lines = [f"### {result['route']} ({result['compilation']['mode']}, {result['compilation']['cudagraph_mode']}, "
             f"attention {', '.join(result['attention_backends'])})", "",
             f"profiled run {profile['wall_s'] * 1e3:.0f} ms wall, {profile['total_us'] / 1e3:.1f} ms {device} time in "
             f"kernels, {profile['total_us'] / steps:.0f} µs per decode step ({steps} steps, prefill included)", "",
             f"| kernel | calls | {device} µs | µs per step |", "|---|---:|---:|---:|"]
    lines += [f"| `{k['name']}` | {k['calls']} | {k['us']} | {k['us'] / steps:.1f} |" for k in profile["kernels"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="llm_runner JSON results with a profile")
    args = parser.parse_args(argv)
    for path in args.results:
        print(route_table(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
