"""vLLM's fused MoE experts three ways, side by side on one GPU: which way bi-compile should make them invariant.

    PYTHONPATH=.:/path/to/vllm-site python benchmarks/moe.py [--ms 1 4 16 64 256 1024 4096] [--markdown FILE]

- ``vllm-tuned``: vLLM's Triton ``fused_experts`` with its own config per M (stock vLLM: its shipped tuned file
  for this device and shape, else ``get_default_config``): the control, which changes tiles with M.
- ``vllm-pinned``: the same kernel with bi-compile's pinned config (``bi_compile.vllm_moe.PINNED_CONFIGS`` for
  this device, through vLLM's ``override_config``), what the worker sets for every M.
- ``bi.grouped_mm``: the experts as bi-compile's own ops: the token-expert pairs sorted by expert, ``bi.grouped_mm``
  up, vLLM's ``silu_and_mul``, ``bi.grouped_mm`` down, the routing weights, and a token's top-k rows added in a
  fixed order.

Qwen3-30B-A3B's layer (128 experts, top 8, hidden 2048, expert width 768), bf16, routing from random router
logits. Each time is the median of ``triton.testing.do_bench_cudagraph`` (the experts only; routing made
beforehand). Each way is also checked for invariance: the output rows of a batch of M against the same tokens
computed alone (M = 1), bitwise; ``rows differ`` counts those that changed (of 8 rows checked per M).
"""

from __future__ import annotations

import argparse
import sys

import torch

from kernels import heading, publish

E, TOP_K, HIDDEN, INNER = 128, 8, 2048, 768
DEFAULT_MS = (1, 2, 4, 8, 16, 64, 256, 1024, 4096)
CHECKED_ROWS = 8


def routing(m: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts and renormalised weights of ``m`` tokens from random router logits (row by row)."""
    logits = torch.randn(m, E, generator=generator, device="cuda", dtype=torch.float32)
    weights, ids = logits.softmax(-1).topk(TOP_K, dim=-1)
    return (weights / weights.sum(-1, keepdim=True)), ids.to(torch.int32)


def grouped_experts(x, w13, w2, weights, ids):
    """The experts through bi.grouped_mm: rows sorted by expert (stable), one group per expert, then each token's
    top-k rows weighted and added in the order of its top-k slots."""
    from vllm import _custom_ops  # noqa: F401  (registers torch.ops._C.silu_and_mul)

    m = x.shape[0]
    flat = ids.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    ends = torch.searchsorted(flat[order], torch.arange(1, E + 1, device=x.device, dtype=flat.dtype)).to(torch.int32)
    rows = x[order // TOP_K]
    up = torch.ops.bi.grouped_mm(rows, w13.transpose(1, 2), ends)
    act = torch.empty(up.shape[0], INNER, dtype=x.dtype, device=x.device)
    torch.ops._C.silu_and_mul(act, up)
    down = torch.ops.bi.grouped_mm(act, w2.transpose(1, 2), ends)
    per_slot = torch.empty_like(down).index_copy_(0, order, down).view(m, TOP_K, HIDDEN).float()
    per_slot = per_slot * weights.unsqueeze(-1)
    out = per_slot[:, 0]
    for k in range(1, TOP_K):
        out = out + per_slot[:, k]
    return out.to(x.dtype)


def ways(pinned: dict):
    from vllm.model_executor.layers.fused_moe import override_config
    from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts

    def tuned(x, w13, w2, weights, ids):
        return fused_experts(x, w13, w2, weights, ids)

    def pinned_way(x, w13, w2, weights, ids):
        with override_config(pinned):
            return fused_experts(x, w13, w2, weights, ids)

    return {"vllm-tuned": tuned, "vllm-pinned": pinned_way, "bi.grouped_mm": grouped_experts}


def rows_differ(way, x, w13, w2, weights, ids) -> int:
    """Of CHECKED_ROWS rows spread over the batch, how many differ from the same token computed alone."""
    batched = way(x, w13, w2, weights, ids)
    picks = torch.linspace(0, x.shape[0] - 1, min(CHECKED_ROWS, x.shape[0])).long().tolist()
    return sum(not torch.equal(way(x[i:i + 1], w13, w2, weights[i:i + 1], ids[i:i + 1])[0], batched[i])
               for i in picks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ms", nargs="+", type=int, default=list(DEFAULT_MS), help="tokens M per call")
    parser.add_argument("--markdown", metavar="FILE", help="append the table to FILE")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/moe.py needs a CUDA GPU: torch.cuda.is_available() is False")
    import triton

    import bi_compile.ops  # noqa: F401
    from bi_compile.vllm_moe import pinned_config

    pinned = pinned_config()
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(E, 2 * INNER, HIDDEN, generator=g, device="cuda", dtype=torch.bfloat16) * HIDDEN ** -0.5
    w2 = torch.randn(E, HIDDEN, INNER, generator=g, device="cuda", dtype=torch.bfloat16) * INNER ** -0.5
    header = ["M", *(f"{name} us" for name in ways(pinned)), "pinned/tuned", "grouped/tuned",
              *(f"{name} rows differ" for name in ways(pinned))]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in args.ms:
        x = torch.randn(m, HIDDEN, generator=g, device="cuda", dtype=torch.bfloat16)
        weights, ids = routing(m, g)
        times, differ = {}, {}
        for name, way in ways(pinned).items():
            times[name] = triton.testing.do_bench_cudagraph(lambda: way(x, w13, w2, weights, ids)) * 1e3
            differ[name] = rows_differ(way, x, w13, w2, weights, ids)
        tuned = times["vllm-tuned"]
        lines.append("| " + " | ".join([str(m), *(f"{t:.1f}" for t in times.values()),
                                          f"{times['vllm-pinned'] / tuned:.2f}",
                                          f"{times['bi.grouped_mm'] / tuned:.2f}",
                                          *(str(d) for d in differ.values())]) + " |")
        print(lines[-1], flush=True)
    import vllm

    title = heading(f"vLLM fused MoE, E={E} top-{TOP_K} {HIDDEN}->{INNER}, bf16",
                    f"vLLM {vllm.__version__}; pinned config {pinned}; do_bench_cudagraph medians")
    publish("\n".join([title, "", *lines]) + "\n", args.markdown)


if __name__ == "__main__":
    main()
