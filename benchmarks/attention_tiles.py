"""Search the attention config table: time candidate configs of the bi attention kernel against SDPA, and check each.

    PYTHONPATH=. python benchmarks/attention_tiles.py --json attention_tiles.json --markdown attention_tiles.md
    PYTHONPATH=. python benchmarks/attention_tiles.py --heads 32/8x128 --prefill 2048 --decode 1x8192 64x8192

One ``AttentionConfig`` serves every call of a (head dim, dtype) on a device (``ATTENTION_CONFIGS``), so every
candidate runs every case of its head shape: causal prefill at batch 1 (L = S) and decode (one query over S keys)
at the given batches, bf16, GQA, no mask, so that stock SDPA takes its flash kernel. Timing as
``benchmarks/kernels.py --cuda-graph`` (median of do_bench_cudagraph, back-to-back calls on L2-cold inputs), beside
SDPA, in the same run.

A candidate's chunk length (``block_n``) and split length (``split_n``) set the order in which a row's keys are added
up, so its bits differ from the table's: that is allowed, one order per device and head shape. What it must keep is
its own invariance: the batch decides whether the keys are split over programs and merged, so its single-program and
split-key schedules must give the same bits (a decode and a prefill case of the head shape), and its output must stay
within the float64 reference's tolerance. A candidate that fails either, or does not compile, is listed and not
timed. The best candidate per head shape (geometric mean of its ratios to SDPA over the cases) is what the table could
reach at most; docs/benchmarks.md, "Attention", says which device each table entry was tuned on.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import astuple

import torch
import torch.nn.functional as F
from kernels import GRAPH_TIMING, graph_sets, heading, publish, time_us

from bi_compile.kernels.attention import AttentionConfig, attention, attention_config

# (block_m, block_n, split_n, num_warps, num_stages) per head dim, bf16. The tile height stays one per config (a
# 16-row tile gives other bits than a 64-row one: kernels/attention.py, "Rows"); 128 rows need 8 warps (a warpgroup's
# wgmma per 64 rows).
CANDIDATES = {
    64: [(128, 64, 512, 8, 3), (128, 64, 512, 8, 2), (128, 128, 512, 8, 2), (128, 64, 1024, 8, 3),
         (64, 64, 512, 4, 3), (64, 64, 512, 4, 4), (64, 128, 512, 4, 2)],
    128: [(128, 64, 512, 8, 3), (128, 64, 512, 8, 2), (128, 64, 512, 8, 4), (128, 32, 512, 8, 3),
          (128, 128, 512, 8, 2), (128, 64, 256, 8, 3), (128, 64, 1024, 8, 3), (64, 64, 512, 4, 3),
          (64, 32, 512, 4, 3), (64, 64, 512, 8, 3)],
    256: [(64, 32, 512, 8, 2), (64, 32, 512, 8, 3), (64, 64, 512, 8, 2), (64, 32, 1024, 8, 2), (64, 32, 512, 4, 2),
          (64, 16, 512, 8, 3)],
}
DEFAULT_HEADS = ("32/8x128", "16/8x128")  # Gemma's head dim 256: --heads 16/8x256
DEFAULT_PREFILL = (2048, 8192)
DEFAULT_DECODE = ("1x2048", "1x8192", "16x2048", "16x8192", "64x2048", "64x8192")
DTYPE = torch.bfloat16
# Against float64, times max(|reference|, 1), as tests/test_ops_attention.py's reference check.
TOLERANCE = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
# (batch, q_len, kv_len, causal) of the invariance check: decode and causal prefill over 2-6 splits of the keys.
CHECK_CASES = ((3, 1, 1500, False), (1, 1500, 1500, True))


def label(config: AttentionConfig) -> str:
    return "m{} n{} split{} w{} s{}".format(*astuple(config))


def inputs(batch: int, heads: int, kv_heads: int, dim: int, q_len: int, kv_len: int, device: str = "cuda",
           dtype: torch.dtype = DTYPE) -> tuple:
    return (torch.randn(batch, heads, q_len, dim, device=device).to(dtype),
            *(torch.randn(batch, kv_heads, kv_len, dim, device=device).to(dtype) for _ in range(2)))


def bi(config: AttentionConfig, causal: bool):
    return lambda q, k, v: attention(q, k, v, None, causal, q.shape[-1] ** -0.5, None, config)


def sdpa(causal: bool):
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def reference(q, k, v, causal: bool) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q.double(), k, v, is_causal=causal)


def check(config: AttentionConfig, heads: int, kv_heads: int, dim: int, device: str = "cuda",
          dtype: torch.dtype = DTYPE) -> str | None:
    """Why ``config`` may not enter a table, or None: its schedules' bits differ, or it misses the reference."""
    torch.manual_seed(0)
    for batch, q_len, kv_len, causal in CHECK_CASES:
        q, k, v = inputs(batch, heads, kv_heads, dim, q_len, kv_len, device, dtype)
        single, split = (attention(q, k, v, None, causal, dim**-0.5, split_kv, config) for split_kv in (False, True))
        if not torch.equal(single, split):
            return f"split and single-program bits differ (B={batch} L={q_len} S={kv_len})"
        want = reference(q, k, v, causal)
        error, bound = (single.double() - want).abs().max().item(), TOLERANCE[dtype] * max(want.abs().max().item(), 1)
        if error > bound:
            return f"max error {error:.3g} > {bound:.3g} against float64 (B={batch} L={q_len} S={kv_len})"
    return None


def search(heads: int, kv_heads: int, dim: int, prefill: list[int], decode: list[tuple[int, int]]) -> dict:
    from tqdm import tqdm

    cases = [(f"prefill {s}", 1, s, s, True) for s in prefill] + [(f"decode {b}x{s}", b, 1, s, False)
                                                                  for b, s in decode]
    current = attention_config(dim, dim, DTYPE)
    configs = [current] + [c for c in (AttentionConfig(*t) for t in CANDIDATES[dim]) if c != current]
    result = {"heads": f"{heads}/{kv_heads}x{dim}", "current": label(current), "cases": [c[0] for c in cases],
              "sdpa_us": {}, "candidates": {}, "refused": {}, "failed": {}}
    arg_sets = {}
    for name, batch, q_len, kv_len, causal in cases:
        first = inputs(batch, heads, kv_heads, dim, q_len, kv_len)
        arg_sets[name] = [first] + [inputs(batch, heads, kv_heads, dim, q_len, kv_len)
                                    for _ in range(graph_sets(first) - 1)]
        result["sdpa_us"][name] = time_us(sdpa(causal), arg_sets[name], True)
    for config in tqdm(configs, desc=result["heads"], leave=False):
        try:
            refusal = check(config, heads, kv_heads, dim)
            if refusal:
                result["refused"][label(config)] = refusal
                continue
            result["candidates"][label(config)] = {name: time_us(bi(config, causal), arg_sets[name], True)
                                                   for name, _, _, _, causal in cases}
        except Exception as error:  # noqa: BLE001 - too much shared memory, or a lowering this Triton lacks
            result["failed"][label(config)] = f"{type(error).__name__}: {str(error)[:200]}"
    return result


def ratios(result: dict, config: str) -> list[float]:
    return [result["candidates"][config][name] / result["sdpa_us"][name] for name in result["cases"]]


def geomean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


def markdown(results: list[dict], title: str) -> str:
    """Per head shape: SDPA's time per case, then each timed candidate's ratio to it (the current entry first,
    marked), its geometric mean, and the candidates refused or failed."""
    lines = [title]
    for r in results:
        lines += ["", f"**{r['heads']}**, current entry {r['current']}", "",
                  "| config | " + " | ".join(r["cases"]) + " | geomean |", "|---|" + "---:|" * (len(r["cases"]) + 1),
                  "| SDPA us | " + " | ".join(f"{r['sdpa_us'][c]:.1f}" for c in r["cases"]) + " | |"]
        for config in sorted(r["candidates"], key=lambda c: geomean(ratios(r, c))):
            mark = " (current)" if config == r["current"] else ""
            lines.append(f"| {config}{mark} | " + " | ".join(f"{x:.2f}" for x in ratios(r, config))
                         + f" | {geomean(ratios(r, config)):.2f} |")
        lines += [f"- refused {config}: {why}" for config, why in r["refused"].items()]
        lines += [f"- failed {config}: {why}" for config, why in r["failed"].items()]
        if r["candidates"]:
            best = min(r["candidates"], key=lambda c: geomean(ratios(r, c)))
            now = geomean(ratios(r, r["current"])) if r["current"] in r["candidates"] else float("nan")
            lines += ["", f"bi/SDPA geomean: current {now:.2f}, best {best} {geomean(ratios(r, best)):.2f}"]
    return "\n".join(lines) + "\n"


def head_shape(text: str) -> tuple[int, int, int]:
    """"32/8x128" -> (32, 8, 128): query heads, kv heads, head dim (one of CANDIDATES')."""
    heads, rest = text.split("/")
    kv_heads, dim = rest.split("x")
    if int(dim) not in CANDIDATES:
        raise argparse.ArgumentTypeError(f"head dim {dim}: candidates exist for {', '.join(map(str, CANDIDATES))}")
    return int(heads), int(kv_heads), int(dim)


def decode_case(text: str) -> tuple[int, int]:
    """"64x8192" -> (64, 8192): batch, keys."""
    batch, keys = text.split("x")
    return int(batch), int(keys)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", nargs="+", type=head_shape, default=[head_shape(h) for h in DEFAULT_HEADS],
                        metavar="H/HKVxD")
    parser.add_argument("--prefill", nargs="*", type=int, default=list(DEFAULT_PREFILL), metavar="L")
    parser.add_argument("--decode", nargs="*", type=decode_case, default=[decode_case(d) for d in DEFAULT_DECODE],
                        metavar="BxS")
    parser.add_argument("--json", help="write every timing to this file")
    parser.add_argument("--markdown", help="append the table to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/attention_tiles.py needs a CUDA GPU")
    results = []
    for heads, kv_heads, dim in args.heads:
        results.append(search(heads, kv_heads, dim, args.prefill, args.decode))
        if args.json:  # head shape by head shape, so that a run cut short by a time limit keeps what it measured
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    publish(markdown(results, heading("Attention config search, bf16", GRAPH_TIMING)), args.markdown)


if __name__ == "__main__":
    main()
