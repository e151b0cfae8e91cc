"""Digests of the bi ops' CUDA outputs at fixed seeds: does a change keep the GPU's bits?

Run ``save`` once with the old source first on PYTHONPATH and once with the new, then ``compare`` (exit status 1
when an output differs); ``save --only`` keeps the ops named, for a change that touches a few kernels (the whole
set takes minutes of compiling). The calls cover every kernel family at M values on both sides of each tile switch,
row lengths on both sides of the fused/looped boundary, and attention with and without the KV split.
``benchmarks/gpu_run.sh bits`` does all three, with the old source from BITS_BEFORE (and ``BITS_ONLY``, ``--only``'s
words).

    PYTHONPATH=/tmp/old python benchmarks/cuda_bits.py save before.json
    python benchmarks/cuda_bits.py save after.json
    python benchmarks/cuda_bits.py compare before.json after.json
    python benchmarks/cuda_bits.py save after.json --only rms_norm add_rms_norm layer_norm var_mean
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def bi_outputs() -> Iterator[tuple[str, Callable[[], torch.Tensor | tuple[torch.Tensor, ...]]]]:
    """(name, the call that makes the output) for every output, the inputs made ahead of the call from one seeded
    generator, so that leaving calls out (``save --only``) never changes another call's inputs. A caller runs each
    call before it takes the next pair: the calls read loop variables."""
    import bi_compile.ops  # noqa: F401  (registers torch.ops.bi from whichever source is on the path)

    bi = torch.ops.bi
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, dtype):
        return torch.randn(*shape, device="cuda", generator=g).to(dtype)

    for dtype in DTYPES:
        for k, n in ((1024, 3072), (4096, 4096), (1000, 520)):
            w = randn(n, k, dtype=dtype) / k**0.5
            x = randn(4096, k, dtype=dtype)
            bias = randn(n, dtype=dtype)
            for m in (1, 17, 33, 64, 65, 129, 300, 2048, 4096):
                yield f"linear {dtype} {k}->{n} M={m}", lambda: bi.linear(x[:m], w)
                yield f"linear+bias {dtype} {k}->{n} M={m}", lambda: bi.linear(x[:m], w, bias)
                yield f"mm {dtype} {k}->{n} M={m}", lambda: bi.mm(x[:m], w.t().contiguous())
        a, b = randn(3, 100, 256, dtype=dtype), randn(3, 256, 72, dtype=dtype)
        yield f"bmm {dtype}", lambda: bi.bmm(a, b)
        addmm_bias = randn(72, dtype=dtype)
        yield f"addmm {dtype}", lambda: bi.addmm(addmm_bias, a[0], b[0], beta=0.5, alpha=1.5)
        ends = torch.tensor([10, 10, 300, 700], dtype=torch.int32, device="cuda")
        tokens, experts = randn(800, 256, dtype=dtype), randn(4, 256, 384, dtype=dtype)
        yield f"grouped_mm {dtype}", lambda: bi.grouped_mm(tokens, experts, ends)
        for n in (128, 1000, 4096, 16384, 20000, 151936):
            x = randn(257, n, dtype=dtype) * 3
            weight = randn(n, dtype=dtype)
            yield f"rms_norm {dtype} N={n}", lambda: bi.rms_norm(x, weight, 1e-6)
            yield f"add_rms_norm {dtype} N={n}", lambda: bi.add_rms_norm(x, x * 0.5, weight, 1e-6)
            yield f"softmax {dtype} N={n}", lambda: bi.softmax(x, -1, False)
            yield f"log_softmax {dtype} N={n}", lambda: bi.log_softmax(x, -1, dtype != torch.float32)
            yield f"sum {dtype} N={n}", lambda: bi.sum(x, [-1], False, torch.float32)
            yield f"mean {dtype} N={n}", lambda: bi.mean(x, [-1], True, None)
            yield f"mean_square {dtype} N={n}", lambda: bi.mean_square(x, [-1], True)
            yield f"layer_norm {dtype} N={n}", lambda: bi.layer_norm(x, weight, weight * 0.25, 1e-5)
            yield f"layer_norm without affine {dtype} N={n}", lambda: bi.layer_norm(x, None, None, 1e-5)
            yield f"var_mean {dtype} N={n}", lambda: bi.var_mean(x, [-1], 1.0, True)
            yield f"logsumexp {dtype} N={n}", lambda: bi.logsumexp(x, [-1], False)
        everything = randn(4096, 151936 // 8, dtype=dtype)
        yield f"sum of everything {dtype}", lambda: bi.sum(everything, [0, 1], False, torch.float32)
        for head_dim in (64, 128, 256):
            for batch, q_len, kv_len in ((1, 1, 2048), (8, 1, 700), (2, 37, 37), (3, 16, 1500)):
                q = randn(batch, q_len, 16, head_dim, dtype=dtype).transpose(1, 2)
                kv = randn(batch, kv_len, 4, head_dim, dtype=dtype).transpose(1, 2)
                mask = torch.rand(batch, 1, q_len, kv_len, device="cuda", generator=g) > 0.3
                shape = f"{dtype} D={head_dim} {batch}x{q_len}x{kv_len}"
                yield (f"attention causal {shape}",
                       lambda: bi.attention(q, kv, kv, None, 0.0, q_len > 1, None, True))
                yield f"attention masked {shape}", lambda: bi.attention(q, kv, kv, mask, 0.0, False, None, True)
        # Paged attention over one cache: 8 decodes (the split schedule), then decodes and prefill chunks with
        # padding tokens (merged), each with tight and static bounds.
        cache = randn(300, 8, 16, 256, dtype=dtype)
        table = torch.randperm(300, device="cuda", generator=g)[:288].view(8, 36).int()
        seq_lens = torch.tensor([1, 37, 300, 512, 513, 90, 575, 2], dtype=torch.int32, device="cuda")
        for name, q_lens, padding in (("decodes", [1] * 8, 0), ("mixed", [1, 5, 64, 1, 200, 90, 3, 2], 5)):
            starts = torch.tensor([0, *q_lens], device="cuda").cumsum(0).int()
            q = randn(sum(q_lens) + padding, 16, 128, dtype=dtype)
            for bounds in ((max(q_lens), 575), (max(q_lens), 576 * 4)):
                yield (f"paged_attention {name} {dtype} bounds {bounds}",
                       lambda: bi.paged_attention(q, cache[..., :128], cache[..., 128:], table, seq_lens, starts,
                                                  0.088, *bounds))


def digest(result: torch.Tensor | tuple[torch.Tensor, ...]) -> list[str]:
    tensors = result if isinstance(result, tuple) else (result,)
    return [hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes()).hexdigest()
            for t in tensors]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    save = commands.add_parser("save", help="write the digests of this source's outputs")
    save.add_argument("path", type=Path)
    save.add_argument("--only", nargs="+", metavar="OP",
                      help="the outputs whose name begins with one of these words, e.g. layer_norm var_mean "
                           "(default: all)")
    compare = commands.add_parser("compare", help="exit 1 if an output's bits differ")
    compare.add_argument("before", type=Path)
    compare.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    if args.command == "save":
        digests = {name: digest(call()) for name, call in bi_outputs()
                   if args.only is None or name.split()[0] in args.only}
        args.path.write_text(json.dumps(digests, indent=0))
        print(f"{len(digests)} outputs saved to {args.path}")
        return 0
    before, after = json.loads(args.before.read_text()), json.loads(args.after.read_text())
    if before.keys() != after.keys():
        print(f"the two runs made different calls: {sorted(before.keys() ^ after.keys())[:10]}")
        return 1
    differ = [name for name in before if before[name] != after[name]]
    print(f"{len(before)} outputs compared, {len(differ)} differ" + "".join(f"\n  {name}" for name in differ))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
