"""Digests of every bi op's CUDA outputs at fixed seeds, to check that a change keeps the GPU's bits.

    python benchmarks/cuda_bits.py save before.json      (with the old source on PYTHONPATH)
    python benchmarks/cuda_bits.py save after.json
    python benchmarks/cuda_bits.py compare before.json after.json
"""
import hashlib
import json
import sys

import torch

def outputs():
    import bi_compile.ops  # noqa: F401
    bi = torch.ops.bi
    out = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s, dtype=torch.bfloat16: torch.randn(*s, device="cuda", generator=g).to(dtype)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for k, n in ((1024, 3072), (4096, 4096), (1000, 520)):
            w = r(n, k, dtype=dtype) / k**0.5
            x = r(4096, k, dtype=dtype)
            bias = r(n, dtype=dtype)
            for m in (1, 17, 33, 64, 65, 129, 300, 2048, 4096):
                out[f"linear {dtype} {k} {n} {m}"] = bi.linear(x[:m], w)
                out[f"linear+b {dtype} {k} {n} {m}"] = bi.linear(x[:m], w, bias)
                out[f"mm {dtype} {k} {n} {m}"] = bi.mm(x[:m], w.t().contiguous())
        a = r(3, 100, 256, dtype=dtype); b = r(3, 256, 72, dtype=dtype)
        out[f"bmm {dtype}"] = bi.bmm(a, b)
        out[f"addmm {dtype}"] = bi.addmm(r(72, dtype=dtype), a[0], b[0], beta=0.5, alpha=1.5)
        ends = torch.tensor([10, 10, 300, 700], dtype=torch.int32, device="cuda")
        out[f"grouped {dtype}"] = bi.grouped_mm(r(800, 256, dtype=dtype), r(4, 256, 384, dtype=dtype), ends)
        for n in (128, 1000, 4096, 16384, 20000, 151936):
            x = r(257, n, dtype=dtype) * 3
            wn = r(n, dtype=dtype)
            out[f"rms {dtype} {n}"] = bi.rms_norm(x, wn, 1e-6)
            out[f"addrms {dtype} {n}"] = bi.add_rms_norm(x, x * 0.5, wn, 1e-6)
            out[f"softmax {dtype} {n}"] = bi.softmax(x, -1, False)
            out[f"logsoftmax {dtype} {n}"] = bi.log_softmax(x, -1, dtype != torch.float32)
            out[f"sum {dtype} {n}"] = bi.sum(x, [-1], False, torch.float32)
            out[f"mean {dtype} {n}"] = bi.mean(x, [-1], True, None)
            out[f"meansq {dtype} {n}"] = bi.mean_square(x, [-1], True)
        out[f"fullsum {dtype}"] = bi.sum(r(4096, 151936 // 8, dtype=dtype), [0, 1], False, torch.float32)
        for hd in (64, 128, 256):
            for bsz, ql, kl in ((1, 1, 2048), (8, 1, 700), (2, 37, 37), (3, 16, 1500)):
                q = r(bsz, ql, 16, hd, dtype=dtype).transpose(1, 2)
                kv = r(bsz, kl, 4, hd, dtype=dtype).transpose(1, 2)
                out[f"attn causal {dtype} {hd} {bsz} {ql} {kl}"] = bi.attention(q, kv, kv, None, 0.0, ql > 1, None, True)
                mask = torch.rand(bsz, 1, ql, kl, device="cuda", generator=g) > 0.3
                out[f"attn mask {dtype} {hd} {bsz} {ql} {kl}"] = bi.attention(q, kv, kv, mask, 0.0, False, None, True)
    return {k: (tuple(v) if isinstance(v, tuple) else (v,)) for k, v in out.items()}

def digest(ts):
    return [hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()).hexdigest() for t in ts]

if sys.argv[1] == "save":
    res = outputs()
    json.dump({k: digest(v) for k, v in res.items()}, open(sys.argv[2], "w"))
    print("saved", len(res))
else:
    a, b = json.load(open(sys.argv[2])), json.load(open(sys.argv[3]))
    assert a.keys() == b.keys()
    diff = [k for k in a if a[k] != b[k]]
    print(f"{len(a)} outputs compared, {len(diff)} differ", diff[:20])
