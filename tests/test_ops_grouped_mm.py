"""bi::grouped_mm, the 2-D x 3-D form of torch._grouped_mm that MoE layers run their experts with: float64
reference (empty groups, rows no group owns, either weight layout), a token's row bitwise independent of how many
other tokens its expert gets and where in the group it sits (with a control that shows stock torch._grouped_mm
changing), input errors; the Triton kernel under the interpreter (fp32/fp16: the interpreter gets bf16 tl.dot
wrong) and on the GPU (``python3 -m pytest -m gpu tests/test_ops_grouped_mm.py``).
"""

from __future__ import annotations

import pytest
import torch

import bi_compile.ops.matmul  # noqa: F401  (registers torch.ops.bi.grouped_mm)
from bi_compile.ops.library import BIInputError

from .row_helpers import cpu_threads

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEVICES = ("cpu", pytest.param("cuda", marks=pytest.mark.gpu))
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def ends(counts, device="cpu") -> torch.Tensor:
    """torch._grouped_mm's ``offs``: the cumulative row ends of groups of these sizes."""
    return torch.tensor(counts, dtype=torch.int32).cumsum(0).to(torch.int32).to(device)


def reference(x, w, offs) -> torch.Tensor:
    out = torch.zeros(x.shape[0], w.shape[2], dtype=torch.float64)
    start = 0
    for group, end in enumerate(offs.tolist()):
        out[start:end] = x[start:end].cpu().double() @ w[group].cpu().double()
        start = end
    return out


def experts(k, n, groups, dtype, device, seed, transposed=False) -> torch.Tensor:
    """[G, K, N] expert weights; ``transposed``: stored [G, N, K] and viewed as [G, K, N] (a weight.mT)."""
    g = torch.Generator().manual_seed(seed)
    if transposed:
        return torch.randn(groups, n, k, generator=g).to(dtype=dtype, device=device).transpose(1, 2)
    return torch.randn(groups, k, n, generator=g).to(dtype=dtype, device=device)


def check_against_reference(grouped_mm, device, dtype):
    g = torch.Generator().manual_seed(1)
    counts = [3, 0, 17, 1, 0, 70]  # groups of several row tiles (16 or 64 rows), in one tile, empty
    x = torch.randn(100, 96, generator=g).to(dtype=dtype, device=device)  # rows 91..99 belong to no group
    offs = ends(counts, device)
    for transposed in (False, True):
        w = experts(96, 40, len(counts), dtype, device, seed=2, transposed=transposed)
        out = grouped_mm(x, w, offs)
        expected = reference(x, w, offs)
        assert out.dtype == dtype and out.shape == (100, 40)
        assert ((out.cpu().double() - expected).abs().max() / expected.abs().max()) < TOLERANCE[dtype]
        assert torch.equal(out[91:].cpu(), torch.zeros(9, 40, dtype=dtype))
        if transposed:
            assert torch.equal(out, grouped_mm(x, w.contiguous(), offs))


def routed_mismatches(grouped_mm, device, dtype, k, n, groups, seed, loads=(2, 3, 16, 64, 200)) -> list[int]:
    """A token alone at its expert vs the same token inside random routings where its expert gets ``load`` tokens
    (it at a random place) and every other expert a random share: loads where its output row differs."""
    g = torch.Generator().manual_seed(seed)
    w = experts(k, n, groups, dtype, device, seed)
    token = torch.randn(1, k, generator=g).to(dtype=dtype, device=device)
    expert = int(torch.randint(groups, (1,), generator=g))
    counts = [0] * groups
    counts[expert] = 1
    alone = grouped_mm(token, w, ends(counts, device))[0]
    bad = []
    for load in loads:
        counts = torch.randint(0, 2 * load, (groups,), generator=g).tolist()
        counts[expert] = load
        x = torch.randn(sum(counts), k, generator=g).to(dtype=dtype, device=device)
        row = sum(counts[:expert]) + int(torch.randint(load, (1,), generator=g))
        x[row] = token[0]
        if not torch.equal(grouped_mm(x, w, ends(counts, device))[row], alone):
            bad.append(load)
    return bad


def bi_grouped_mm(x, w, offs):
    return torch.ops.bi.grouped_mm(x, w, offs)


# ---------------------------------------------------------------- the op (CPU path here, Triton on the GPU)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_float64_with_empty_groups_and_unrouted_rows(device, dtype):
    check_against_reference(bi_grouped_mm, device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_token_row_ignores_the_rest_of_the_routing(device, dtype):
    with cpu_threads(2):
        assert routed_mismatches(bi_grouped_mm, device, dtype, 512, 96, groups=8, seed=3) == []


def test_control_stock_grouped_mm_varies_with_the_expert_load():
    """The check above can fail: stock fp32 torch._grouped_mm on CPU (2 threads) gives a token other bits once its
    expert has a few tokens (measured: from 4 on, K = 2048)."""
    with cpu_threads(2):
        stock = routed_mismatches(lambda x, w, offs: torch._grouped_mm(x, w, offs=offs), "cpu", torch.float32,
                                  2048, 256, groups=8, seed=4)
    assert stock, "stock torch._grouped_mm stayed invariant"


def test_bad_inputs_raise_bi_input_error():
    x, w = torch.randn(6, 16), torch.randn(3, 16, 8)
    offs = ends([2, 2, 2])
    cases = [
        ((x, w, offs.long()), "unsupported dtype torch.int64 for 'offs'"),
        ((x, w, offs[None]), "unsupported rank 2 for 'offs'"),
        ((x, w, offs[:2]), "one entry per group"),
        ((x[None], w, offs), "unsupported rank 3 for 'self'"),
        ((x, w[0], offs), "unsupported rank 2 for 'mat2'"),
        ((x, w.bfloat16(), offs), "one dtype"),
        ((x.double(), w.double(), offs), "float64"),
        ((x[:, :8], w, offs), "inner dimensions differ"),
        ((x.t().contiguous().t(), w, offs), "breaks the layout contract"),
    ]
    for args, needle in cases:
        with pytest.raises(BIInputError) as info:
            torch.ops.bi.grouped_mm(*args)
        assert "bi::grouped_mm:" in str(info.value) and needle in str(info.value), str(info.value)


# ---------------------------------------------------------------- the Triton kernel under the interpreter


interpreter_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the kernel on CUDA")


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_walks_the_groups_like_the_reference(triton_device, dtype):
    """Tiles found from ``offs`` on the device. (A row's bits are a GPU test: the interpreter's tl.dot is numpy's
    matmul, whose bits for a row depend on the rows beside it.)"""
    from bi_compile.kernels.matmul import grouped_matmul

    check_against_reference(grouped_matmul, triton_device, dtype)


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_qwen3_moe_expert_shapes_replay_in_a_cuda_graph_with_new_routing():
    """Qwen3-30B-A3B experts (128 of [2048 -> 768]), 64 tokens x top-8: the routing (offs) is device data, so a
    captured graph replays any routing and gives eager's bits."""
    g = torch.Generator().manual_seed(6)
    w = experts(2048, 768, 128, torch.bfloat16, "cuda", seed=6)
    x = torch.randn(512, 2048, generator=g).bfloat16().cuda()
    offs = ends(torch.multinomial(torch.ones(128), 512, replacement=True, generator=g).bincount(minlength=128).tolist(), "cuda")
    torch.ops.bi.grouped_mm(x, w, offs)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.bi.grouped_mm(x, w, offs)
    for _ in range(3):
        counts = torch.multinomial(torch.ones(128), 512, replacement=True, generator=g).bincount(minlength=128)
        offs.copy_(ends(counts.tolist(), "cuda"))
        x.copy_(torch.randn(512, 2048, generator=g).bfloat16())
        graph.replay()
        assert torch.equal(captured, torch.ops.bi.grouped_mm(x, w, offs))
    assert routed_mismatches(bi_grouped_mm, "cuda", torch.bfloat16, 2048, 768, groups=128, seed=7,
                             loads=(2, 3, 8, 64, 100, 300)) == []


@pytest.mark.gpu
def test_gpu_control_stock_grouped_mm():
    """Stock torch._grouped_mm on the GPU with the same shapes; if it keeps a token's bits at every load tried, the
    measured fact is recorded as a skip instead of a failure."""
    stock = routed_mismatches(lambda x, w, offs: torch._grouped_mm(x, w, offs=offs), "cuda", torch.bfloat16, 2048, 768,
                              groups=128, seed=7, loads=(2, 3, 8, 64, 100, 300))
    if not stock:
        pytest.skip(f"stock torch._grouped_mm kept a token's bits at every expert load tried (torch {torch.__version__})")
