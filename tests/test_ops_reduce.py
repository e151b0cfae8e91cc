"""bi::sum, bi::mean and bi::mean_square: float64 references, bitwise batch invariance, layouts, errors, compile.

CPU tests run the ops' CPU path; the ``triton_device`` tests run the Triton launcher itself (under the
Triton interpreter on CPU when there is no GPU, as conftest arranges); ``@pytest.mark.gpu`` tests need CUDA.
"""

from __future__ import annotations

import random

import pytest
import torch

import bi_compile.ops.reduce  # noqa: F401  (registers torch.ops.bi.sum / mean)
from bi_compile.ops.library import BIInputError

from .row_helpers import assert_graph_replays_eager_bits, assert_same_rows_in_any_buffer, batch_draws, cpu_threads

OPS = ("sum", "mean", "mean_square")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Rounding of the output to its dtype (relative), on top of the fp32 accumulation error.
OUT_RTOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# fp32 accumulation in chunks: error well below this times sum(|x|) of the reduced elements.
ACC_TOL = 1e-6


def bi_op(name: str):
    return getattr(torch.ops.bi, name)


def reduce(name: str, x, dim, keepdim=False, dtype=None):
    """The op with sum/mean's arguments; mean_square has no dtype argument (it is fp32), so only None or fp32."""
    if name == "mean_square":
        assert dtype in (None, torch.float32)
        return torch.ops.bi.mean_square(x, dim, keepdim)
    return bi_op(name)(x, dim, keepdim, dtype=dtype)


def out_dtypes(name: str) -> tuple:
    return (None, torch.float32) if name == "mean_square" else (None, *DTYPES)


def reference(name: str, x, dim, keepdim=False):
    """torch's reduction of the same name (mean_square: mean of the squares)."""
    return (x * x).mean(dim, keepdim=keepdim) if name == "mean_square" else getattr(torch, name)(x, dim, keepdim=keepdim)


def assert_matches_reference(name, x, dim, keepdim, dtype, out):
    """Against aten's float64 reduction of the input's values cast to the output dtype (as aten casts)."""
    out_dtype = torch.float32 if name == "mean_square" else dtype or x.dtype
    x64 = x.to(out_dtype).double()
    expected = reference(name, x64, dim, keepdim)
    scale = reference(name, x64.abs(), dim, keepdim)
    assert out.dtype == out_dtype and out.shape == expected.shape and out.is_contiguous()
    assert out.shape == reference(name, x.to(out_dtype), dim, keepdim).shape  # aten's shape rules
    error = (out.double() - expected).abs()
    bound = ACC_TOL * scale + OUT_RTOL[out_dtype] * expected.abs()
    assert ((error <= bound) | (out.isnan() & expected.isnan()) | (out == expected)).all(), (error - bound).max()


# ---------------------------------------------------------------- CPU path: values


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape, dim", [((3, 5, 64), [-1]), ((3, 5, 64), [0, 2]), ((3, 5, 64), [1]), ((3, 5, 64), None), ((3, 5, 64), []),
                   ((4, 4097), [1]), ((2, 151936), [-1]), ((7, 1), [-1]), ((0, 7), [-1]), ((7, 0), [-1]), ((), None), ((), [0])])
@pytest.mark.parametrize("keepdim", [False, True])
def test_matches_float64(name, dtype, shape, dim, keepdim):
    x = torch.randn(shape).to(dtype)
    for out_dtype in out_dtypes(name):
        assert_matches_reference(name, x, dim, keepdim, out_dtype, reduce(name, x, dim, keepdim, dtype=out_dtype))


@pytest.mark.parametrize("name", OPS)
def test_strided_transposed_and_expanded_inputs(name):
    base = torch.randn(6, 4100)
    row = torch.randn(1, 300)
    cases = [(base[:, :4097], [-1]), (base.t(), [-1]), (base.t(), [0]), (base[:, :64].reshape(6, 4, 16).transpose(0, 1), [0, 2]),
             (row.expand(7, 300), [-1]), (row.expand(7, 300), [0]), (torch.randn(4, 5, 6).permute(2, 0, 1), [1, 2])]
    for x, dim in cases:
        assert_matches_reference(name, x, dim, False, None, bi_op(name)(x, dim, False))
    assert torch.equal(bi_op(name)(row.expand(7, 300), [-1]), bi_op(name)(row, [-1]).expand(7))
    assert torch.equal(bi_op(name)(base.t(), [0]), bi_op(name)(base.t().contiguous(), [0]))


@pytest.mark.parametrize("name", OPS)
def test_nan_and_inf_like_torch(name):
    x = torch.randn(5, 1000)
    x[1, 3] = float("nan")
    x[2, 4] = float("inf")
    x[3, 5], x[3, 6] = float("inf"), float("-inf")
    x[4, 7] = float("-inf")
    out = bi_op(name)(x, [-1])
    torch.testing.assert_close(out, reference(name, x, -1), rtol=1e-5, atol=1e-5, equal_nan=True)


# ---------------------------------------------------------------- CPU path: batch invariance


@pytest.mark.parametrize("name", OPS)
def test_cpu_row_alone_equals_row_in_batch(name):
    """200 draws of (M in 1..512, start, row position, row length, dtype, dtype argument, keepdim): bits
    equal to the row alone. Half the draws reduce dim 0 of a transposed view."""
    rng = random.Random(2)
    bases = {(n, dtype): torch.randn(600, n).to(dtype) for n in (1, 7, 128, 1000) for dtype in DTYPES}
    for start, m, pos in batch_draws(rng, 200, 600):
        x = bases[rng.choice(list(bases))]
        out_dtype, keepdim = rng.choice(out_dtypes(name)), rng.random() < 0.5
        if rng.random() < 0.5:
            batch = reduce(name, x[start : start + m], [-1], keepdim, dtype=out_dtype)[pos]
            alone = reduce(name, x[start + pos : start + pos + 1], [-1], keepdim, dtype=out_dtype)[0]
        else:  # rows are the columns of a transposed view
            batch = reduce(name, x.t()[:, start : start + m], [0], keepdim, dtype=out_dtype)[..., pos]
            alone = reduce(name, x.t()[:, start + pos : start + pos + 1], [0], keepdim, dtype=out_dtype)[..., 0]
        assert torch.equal(batch, alone), (name, start, m, pos, x.shape, x.dtype, out_dtype)


def test_control_stock_sum_is_batch_variant_where_ours_is_not():
    """The check above can fail: stock x.sum(-1) on 151936-wide fp32 rows with two CPU threads gives a row
    other bits in a batch than alone (the row is split across threads only when it is alone). Seeded, 32 rows: a
    single row keeps its bits often."""
    x = torch.randn(32, 151936, generator=torch.Generator().manual_seed(0))
    with cpu_threads(2):
        assert not torch.equal(x.sum(-1), torch.cat([x[i : i + 1].sum(-1) for i in range(len(x))]))
        for name in OPS:
            for n in (4097, 151936):
                batch = bi_op(name)(x[:, :n], [-1])
                assert torch.equal(batch, torch.cat([bi_op(name)(x[i : i + 1, :n], [-1]) for i in range(len(x))]))


# ---------------------------------------------------------------- errors


def test_bad_inputs_raise_bi_input_error():
    x = torch.randn(4, 64)
    cases = [
        ((x.to(torch.float8_e4m3fn), [-1]), {}, "float8_e4m3fn"),
        ((x.to(torch.int32), [-1]), {}, "int32"),
        ((x.double(), [-1]), {}, "float64"),
        ((x, [-1]), {"dtype": torch.int64}, "unsupported dtype argument torch.int64"),
        ((x, [-1]), {"dtype": torch.float64}, "unsupported dtype argument torch.float64"),
        ((x, [2]), {}, "dim 2 out of range"),
        ((x, [0, -3]), {}, "dim -3 out of range"),
        ((x, [1, -1]), {}, "dim 1 appears more than once"),
        ((torch.tensor(1.0), [1]), {}, "dim 1 out of range"),
    ]
    for name in OPS:
        for args, kwargs, needle in cases:
            if name == "mean_square" and kwargs:
                continue  # it has no dtype argument
            with pytest.raises(BIInputError) as info:
                bi_op(name)(*args, **kwargs)
            message = str(info.value)
            assert f"bi::{name}:" in message and needle in message, message
            assert "shape=" in message and "stride=" in message and "dtype=" in message, message


# ---------------------------------------------------------------- torch.compile


def test_compiled_with_dynamic_batch_matches_eager_without_recompiling():
    from torch._dynamo.testing import CompileCounterWithBackend

    def step(hidden):
        variance = torch.ops.bi.mean(hidden.square(), [-1], True)
        return hidden * torch.rsqrt(variance + 1e-6), torch.ops.bi.sum(hidden, [0, 2], False, dtype=torch.bfloat16)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for m in (2, 3, 17, 64):
        hidden = torch.randn(m, 3, 256)
        torch._dynamo.mark_dynamic(hidden, 0)
        for got, want in zip(compiled(hidden), step(hidden)):
            assert torch.equal(got, want)
    assert counter.frame_count == 1


# ---------------------------------------------------------------- the Triton kernel (interpreter on CPU)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [1, 300, 16500])  # packed rows, one padded chunk, the looped path
def test_kernel_matches_reference_and_is_row_invariant(triton_device, dtype, n):
    from bi_compile.kernels.reduce import row_sum

    rows = 24 if n <= 300 else 4
    x = torch.randn(rows, n, device=triton_device).to(dtype)
    for name, out_dtype in (("sum", dtype), ("mean", torch.float32), ("sum", torch.float16), ("mean_square", torch.float32)):
        flags = {"mean": name != "sum", "square": name == "mean_square"}
        out = row_sum(x, out_dtype, **flags)
        assert_matches_reference(name, x.cpu(), [-1], False, out_dtype, out.cpu())
        for start, m in ((0, 1), (3, 2), (1, rows - 1)):
            assert torch.equal(out[start : start + m], row_sum(x[start : start + m], out_dtype, **flags))
    transposed = x.t()  # rows at stride 1, elements at stride n: the launcher copies
    assert_matches_reference("sum", transposed.cpu(), [-1], False, None, row_sum(transposed, dtype).cpu())


def test_kernel_blocking_override_is_exact_and_row_invariant(triton_device):
    """benchmarks/rows.py's knob: more rows per program is another fixed order per row, exact on small integers
    and the same for a row in any batch."""
    from bi_compile.kernels.reduce import RowBlocking, row_sum

    x = torch.randint(-3, 4, (37, 300), device=triton_device).float()
    for rows, warps in ((1, 1), (8, 4), (16, 8)):
        blocking = RowBlocking(block=512, rows=rows, fused=True, num_warps=warps)
        out = row_sum(x, torch.float32, blocking=blocking)
        assert torch.equal(out.cpu(), x.cpu().double().sum(-1).float())
        y = torch.randn(37, 300, device=triton_device)
        full = row_sum(y, torch.float32, mean=True, blocking=blocking)
        assert torch.equal(row_sum(y[5:7], torch.float32, mean=True, blocking=blocking), full[5:7])


def test_kernel_split_rows_sum_their_pieces_in_row_order(triton_device, monkeypatch):
    """Rows longer than one chunk are cut into pieces of a fixed length (a function of the row length alone): exact on
    small integers, the same for a row in any batch, and pieces too many for one chunk are split again."""
    from bi_compile.kernels import reduce

    x = torch.randint(-3, 4, (9, 3000), device=triton_device).float()
    pieces = reduce.RowBlocking(block=256, rows=1, fused=False, num_warps=2, piece=2)  # 6 pieces a row
    assert torch.equal(reduce.row_sum(x, torch.float32, blocking=pieces).cpu(), x.cpu().double().sum(-1).float())
    y = torch.randn(9, 3000, device=triton_device).to(torch.bfloat16)
    for flags in ({}, {"mean": True}, {"mean": True, "square": True}):
        full = reduce.row_sum(y, torch.float32, blocking=pieces, **flags)
        assert torch.equal(reduce.row_sum(y[4:5], torch.float32, blocking=pieces, **flags), full[4:5])
        assert_matches_reference("mean_square" if flags.get("square") else "mean" if flags else "sum", y.cpu(), [-1], False,
                                 torch.float32, full.cpu())
    # A row of 5000 in pieces of 32: 157 partial sums, more than one chunk (64 here), so they are split again.
    small = reduce.RowPolicy(fused_max=64, tile_elements=64, warps=reduce.PackedWarps(512, 8, 16),
                             centred_warps=reduce.PackedWarps(1024, 4, 16), loop=reduce.RowBlocking(64, 1, False, 1),
                             split=reduce.RowBlocking(block=16, rows=1, fused=False, num_warps=1, piece=2))
    monkeypatch.setitem(reduce.ROW_POLICIES, reduce.Backend.CUDA, small)
    launch, widths = reduce._launch_row_sum, []

    def recorded(x, *rest):
        widths.append(x.shape[-1])
        launch(x, *rest)

    monkeypatch.setattr(reduce, "_launch_row_sum", recorded)
    long_rows = torch.randint(-3, 4, (2, 5000), device=triton_device).float()
    assert torch.equal(reduce.row_sum(long_rows, torch.float32).cpu(), long_rows.cpu().double().sum(-1).float())
    assert widths == [5000, 157, 5]


@pytest.mark.parametrize("name", OPS)
def test_op_triton_path_layouts(triton_device, name):
    """The op's Triton entry (checks, moving the reduced dims last, launch) on the layouts the CPU tests use."""
    from bi_compile.ops import reduce as ops

    kind = {"sum": ops.SUM, "mean": ops.MEAN, "mean_square": ops.MEAN_SQUARE}[name]

    x = torch.randn(3, 5, 64, device=triton_device)
    cases = [(x, [-1], False, None), (x, [0, 2], True, None), (x.half(), None, False, torch.float32), (x, [], True, None),
             (x.transpose(0, 2), [1], False, torch.float16), (torch.randn(7, 0, device=triton_device), [-1], False, None),
             (torch.tensor(2.0, device=triton_device), [0], True, None), (torch.randn(0, 3, device=triton_device), [1], False, None)]
    for inp, dim, keepdim, dtype in cases:
        dtype = torch.float32 if name == "mean_square" else dtype  # what the op passes for it
        out = ops._triton(kind, inp, dim, keepdim, dtype)
        assert_matches_reference(name, inp.cpu(), dim, keepdim, dtype, out.cpu())
    with pytest.raises(BIInputError, match="appears more than once"):
        ops._triton(kind, x, [0, -3], False, None)


def test_op_triton_path_launches_in_place_rows_from_its_plan(triton_device, monkeypatch):
    """Rows the kernel reads in place (a view of aligned data) take the launch planned once per layout; misaligned
    data, rows that need a copy and split rows take row_sum. Both give the same bits."""
    from bi_compile.kernels import reduce as kernels
    from bi_compile.ops import reduce as ops

    general = []
    row_sum = kernels.row_sum
    monkeypatch.setattr(kernels, "row_sum", lambda *args, **kwargs: general.append(args[0].shape) or row_sum(*args, **kwargs))
    x = torch.randn(3, 5, 80, device=triton_device).to(torch.bfloat16)  # rows 80 elements apart
    long_rows = torch.randn(2, 40000, device=triton_device)
    cases = {  # input, dim, whether the planned launch takes it, the rows as a contiguous [..., R]
        "rows in place": (x[..., :64], [-1], True, x[..., :64].contiguous()),
        "a 3-D batch of rows": (x[:, :4, :64], [-1], True, x[:, :4, :64].contiguous()),
        "reduced dim first, in place": (x.transpose(0, 2), [0], True, x.transpose(0, 1).contiguous()),
        "misaligned data": (x[..., 1:65], [-1], False, x[..., 1:65].contiguous()),  # starting 2 bytes in
        "rows that need a copy": (x, [0, 2], False, x.transpose(0, 1).reshape(5, 240)),
        "rows in pieces": (long_rows, [-1], False, long_rows),
    }
    for name, (inp, dim, planned, rows) in cases.items():
        general.clear()
        out = ops._triton(ops.MEAN_SQUARE, inp, dim, True, torch.float32)
        assert (general == []) == planned, name
        assert torch.equal(out.flatten(), row_sum(rows, torch.float32, mean=True, square=True).flatten()), name
    launch = ops._in_place_launch(ops.MEAN_SQUARE, x[..., :64], [-1], True, torch.float32)
    assert ops._in_place_launch(ops.MEAN_SQUARE, x.clone()[..., :64], [-1], True, torch.float32) is launch


# ---------------------------------------------------------------- GPU


GPU_BATCHES = (1, 2, 3, 5, 16, 17, 64, 100, 255, 1024, 4097, 8192)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1024, 4096, 151936])
def test_gpu_batch_invariance(dtype, n):
    base = torch.randn(8192 + 80, n, device="cuda", dtype=dtype)
    for name in OPS:
        for out_dtype in (None, torch.float32):
            for start in (0, 3, 77):
                whole = reduce(name, base[start : start + 8192], [-1], True, dtype=out_dtype)
                for m in GPU_BATCHES:
                    part = reduce(name, base[start : start + m], [-1], True, dtype=out_dtype)
                    assert torch.equal(whole[:m], part), (name, n, dtype, out_dtype, start, m)
        assert_matches_reference(name, base[:64].cpu(), [-1], False, None, bi_op(name)(base[:64], [-1]).cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("n", [4096, 4097])
def test_gpu_same_row_in_any_buffer(n):
    for name in OPS:
        assert_same_rows_in_any_buffer(lambda rows: reduce(name, rows, [-1], dtype=torch.float32), n)


@pytest.mark.gpu
def test_gpu_full_reduction_runs_in_pieces_and_matches_float64(monkeypatch):
    """x.sum() is one row of 622 M elements: 18992 pieces, more than one chunk, so their sums are split again."""
    from bi_compile.kernels import reduce as kernels

    x = torch.randn(4096 * 151936, device="cuda").to(torch.bfloat16)
    launch, widths = kernels._launch_row_sum, []
    monkeypatch.setattr(kernels, "_launch_row_sum", lambda rows, *rest: widths.append(rows.shape[-1]) or launch(rows, *rest))
    total = torch.ops.bi.sum(x, None, dtype=torch.float32)
    assert widths == [x.numel(), 18992, 1]
    torch.testing.assert_close(total, x.double().sum().float(), rtol=1e-6, atol=0.5)
    mean = torch.ops.bi.mean(x, None, dtype=torch.float32)
    torch.testing.assert_close(mean, x.double().mean().float(), rtol=1e-6, atol=1e-9)


@pytest.mark.gpu
def test_gpu_control_stock_sum_is_batch_variant():
    """The comparisons above can fail: stock fp32 x.sum(-1) on 151936-wide rows gives row 0 other bits in
    some batch than alone (measured from M = 2 on, on the H100)."""
    x = torch.randn(4096, 151936, device="cuda")
    alone = x[:1].sum(-1)
    assert any(not torch.equal(x[:m].sum(-1)[:1], alone) for m in (2, 3, 16, 64, 512, 4096))


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_replays_eager_bits():
    hidden = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    assert_graph_replays_eager_bits(lambda x: torch.ops.bi.mean(x, [-1], True, dtype=torch.float32), hidden)


@pytest.mark.gpu
def test_gpu_compiled_with_dynamic_batch_matches_eager():
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: torch.ops.bi.mean(x.float().square(), [-1], True), fullgraph=True)
    for m in (2, 7, 64, 300):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        torch._dynamo.mark_dynamic(x, 0)
        assert torch.equal(compiled(x), torch.ops.bi.mean(x.float().square(), [-1], True))
