"""bi::rms_norm, bi::add_rms_norm and bi::layer_norm: float64 references, bitwise batch invariance, layouts, errors, compile.

CPU tests run the ops' CPU path; the ``triton_device`` tests run the Triton launcher itself (under the
Triton interpreter on CPU when there is no GPU, as conftest arranges); ``@pytest.mark.gpu`` tests need CUDA.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import bi_compile.ops.norm  # noqa: F401  (registers torch.ops.bi.rms_norm / add_rms_norm)
from bi_compile.ops.library import BIInputError

from .row_helpers import (
    assert_graph_replays_eager_bits,
    assert_same_rows_in_any_buffer,
    batch_draws,
    cpu_threads,
    skip_unless_stock_is_batch_variant,
)

EPS = 1e-6
# (rtol, atol) of outputs rounded to each dtype against the float64 reference.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}
DTYPES = tuple(TOL)


def reference(x: torch.Tensor, weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 RMSNorm of the input's values: (y, rstd)."""
    x64 = x.double()
    rstd = torch.rsqrt(x64.square().mean(-1, keepdim=True) + EPS)
    y = x64 * rstd
    return (y * weight.double() if weight is not None else y), rstd


def assert_matches_reference(x, weight, y, rstd):
    y_ref, rstd_ref = reference(x, weight)
    rtol, atol = TOL[x.dtype]
    assert y.dtype == x.dtype and y.shape == x.shape and y.is_contiguous()
    assert rstd.dtype == torch.float32 and rstd.shape == x.shape[:-1] + (1,) and rstd.is_contiguous()
    torch.testing.assert_close(y.double(), y_ref, rtol=rtol, atol=atol, equal_nan=True)
    torch.testing.assert_close(rstd.double(), rstd_ref, rtol=1e-5, atol=0, equal_nan=True)


def layer_norm_reference(x, weight, bias):
    """float64 LayerNorm of the input's values: (y, mean, rstd)."""
    x64 = x.double()
    mean = x64.mean(-1, keepdim=True)
    rstd = torch.rsqrt((x64 - mean).square().mean(-1, keepdim=True) + EPS)
    y = (x64 - mean) * rstd
    y = y * weight.double() if weight is not None else y
    return (y + bias.double() if bias is not None else y), mean, rstd


def assert_layer_norm_matches_reference(x, weight, bias, y, mean, rstd):
    y_ref, mean_ref, rstd_ref = layer_norm_reference(x, weight, bias)
    rtol, atol = TOL[x.dtype]
    assert y.dtype == x.dtype and y.shape == x.shape and y.is_contiguous()
    for stat in (mean, rstd):
        assert stat.dtype == torch.float32 and stat.shape == x.shape[:-1] + (1,) and stat.is_contiguous()
    torch.testing.assert_close(y.double(), y_ref, rtol=rtol, atol=atol, equal_nan=True)
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(rstd.double(), rstd_ref, rtol=1e-5, atol=0, equal_nan=True)


# ---------------------------------------------------------------- CPU path: values


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 4097), (7, 1), (2, 151936)])
@pytest.mark.parametrize("weight_dtype", ["same", "fp32", None])
def test_rms_norm_matches_float64(dtype, shape, weight_dtype):
    x = torch.randn(shape).to(dtype)
    weight = None if weight_dtype is None else torch.randn(shape[-1]).to(dtype if weight_dtype == "same" else torch.float32)
    y, rstd = torch.ops.bi.rms_norm(x, weight, EPS)
    assert_matches_reference(x, weight, y, rstd)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 768), (2, 5, 4097), (7, 1), (4, 13), (2, 151936)])
@pytest.mark.parametrize("affine", ["weight+bias", "fp32 weight+bias", "weight", None])
def test_layer_norm_matches_float64(dtype, shape, affine):
    x = (torch.randn(shape) * 3 + 5).to(dtype)  # an offset mean: what a one-pass E[x^2] - mean^2 would lose
    param_dtype = torch.float32 if affine and affine.startswith("fp32") else dtype
    weight = torch.randn(shape[-1]).to(param_dtype) if affine else None
    bias = torch.randn(shape[-1]).to(param_dtype) if affine and affine.endswith("bias") else None
    assert_layer_norm_matches_reference(x, weight, bias, *torch.ops.bi.layer_norm(x, weight, bias, EPS))


def test_layer_norm_is_aten_native_layer_norm():
    x, weight, bias = torch.randn(4, 9, 300), torch.randn(300), torch.randn(300)
    for got, want in zip(torch.ops.bi.layer_norm(x, weight, bias, EPS),
                         torch.ops.aten.native_layer_norm(x, [300], weight, bias, EPS)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_is_the_unfused_add_then_rms_norm(dtype):
    x1, x2 = torch.randn(2, 6, 1000).to(dtype), torch.randn(2, 6, 1000).to(dtype)
    weight = torch.randn(1000)
    y, rstd, s = torch.ops.bi.add_rms_norm(x1, x2, weight, EPS)
    assert torch.equal(s, x1 + x2) and s.is_contiguous()
    assert_matches_reference(x1 + x2, weight, y, rstd)
    y_alone, rstd_alone = torch.ops.bi.rms_norm(s, weight, EPS)
    assert torch.equal(y, y_alone) and torch.equal(rstd, rstd_alone)


def test_empty_and_single_rows():
    weight = torch.randn(64)
    for x in (torch.randn(0, 64), torch.randn(1, 64), torch.randn(64), torch.randn(2, 0, 64)):
        y, rstd = torch.ops.bi.rms_norm(x, weight, EPS)
        assert_matches_reference(x, weight, y, rstd)
    y, rstd = torch.ops.bi.rms_norm(torch.randn(3, 0), None, EPS)  # no elements: the mean is NaN, as in torch
    assert y.shape == (3, 0) and rstd.shape == (3, 1) and rstd.isnan().all()
    for x in (torch.randn(0, 64), torch.randn(1, 64), torch.randn(64), torch.randn(2, 0, 64)):
        assert_layer_norm_matches_reference(x, weight, weight, *torch.ops.bi.layer_norm(x, weight, weight, EPS))
    y, mean, rstd = torch.ops.bi.layer_norm(torch.randn(3, 0), None, None, EPS)
    assert y.shape == (3, 0) and rstd.isnan().all()


def test_strided_head_split_and_expanded_inputs():
    qkv = torch.randn(5, 3 * 4 * 16)
    q_by_head = qkv[:, : 4 * 16].view(5, 4, 16)  # rows at two strides, as vLLM's q_norm sees them
    wide = torch.randn(6, 4100)[:, :4097]  # strided rows
    row = torch.randn(1, 300)
    for x in (q_by_head, wide, row.expand(7, 300), torch.randn(4, 6, 8).transpose(0, 1)):
        weight = torch.randn(x.shape[-1])
        y, rstd = torch.ops.bi.rms_norm(x, weight, EPS)
        assert_matches_reference(x, weight, y, rstd)
    y, _ = torch.ops.bi.rms_norm(row.expand(7, 300), None, EPS)
    assert torch.equal(y, torch.ops.bi.rms_norm(row, None, EPS)[0].expand(7, 300))
    residual = torch.randn(1, 4097)
    y, rstd, s = torch.ops.bi.add_rms_norm(wide, residual.expand(6, 4097), None, EPS)
    assert torch.equal(s, wide + residual)
    assert_matches_reference(s, None, y, rstd)
    for x in (q_by_head, wide, row.expand(7, 300)):
        weight, bias = torch.randn(x.shape[-1]), torch.randn(x.shape[-1])
        out = torch.ops.bi.layer_norm(x, weight, bias, EPS)
        assert_layer_norm_matches_reference(x, weight, bias, *out)
        assert all(torch.equal(a, b) for a, b in zip(out, torch.ops.bi.layer_norm(x.contiguous(), weight, bias, EPS)))


def test_nan_and_inf_propagate_like_torch():
    x = torch.randn(4, 100)
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    x[3] = float("-inf")
    y, rstd = torch.ops.bi.rms_norm(x, None, EPS)
    assert_matches_reference(x, None, y, rstd)
    assert y[1].isnan().all() and y[2, 5].isnan() and (y[2, :5] == 0).all() and y[3].isnan().all()
    # A NaN or inf makes the row and its rstd NaN, as in torch; the mean of a row of finite values and infs of one sign
    # is that inf (torch's CPU kernel says NaN).
    y, mean, rstd = torch.ops.bi.layer_norm(x, None, None, EPS)
    y_ref, mean_ref, rstd_ref = torch.ops.aten.native_layer_norm(x, [100], None, None, EPS)
    for got, want in ((y, y_ref), (rstd, rstd_ref), (mean[:2], mean_ref[:2])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert y[1:].isnan().all() and not y[0].isnan().any() and mean[2:, 0].tolist() == [float("inf"), -float("inf")]


# ---------------------------------------------------------------- CPU path: batch invariance


@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm", "layer_norm"])
def test_cpu_row_alone_equals_row_in_batch(op):
    """200 draws of (M in 1..512, start, row position, row length, dtype): bits equal to the row alone.
    (Rows of 4097 and 151936 are checked in the control test below, on fewer batches.)"""
    rng = random.Random(0)
    bases = {(n, dtype): (torch.randn(600, n).to(dtype), torch.randn(600, n).to(dtype), torch.randn(n))
             for n in (1, 7, 128, 1000) for dtype in DTYPES}
    for start, m, pos in batch_draws(rng, 200, 600):
        x1, x2, weight = bases[rng.choice(list(bases))]

        def run(rows: slice):
            if op == "layer_norm":
                return torch.ops.bi.layer_norm(x1[rows], weight, weight, EPS)
            inputs = (x1[rows],) if op == "rms_norm" else (x1[rows], x2[rows])
            return getattr(torch.ops.bi, op)(*inputs, weight, EPS)

        batch, alone = run(slice(start, start + m)), run(slice(start + pos, start + pos + 1))
        for out_batch, out_alone in zip(batch, alone):
            assert torch.equal(out_batch[pos], out_alone[0]), (op, start, m, pos, x1.shape, x1.dtype)


def test_control_stock_rms_norm_is_batch_variant_where_ours_is_not():
    """The check above can fail: stock F.rms_norm on 151936-wide fp32 rows with two CPU threads gives a row
    other bits in a batch than alone (the row is split across threads only when it is alone). Seeded, and 32 rows:
    about four rows in five keep their bits, so 8 unseeded rows all kept them in ~15% of runs."""
    x = torch.randn(32, 151936, generator=torch.Generator().manual_seed(0))
    with cpu_threads(2):
        stock_batch = F.rms_norm(x, (x.shape[-1],), eps=EPS)
        stock_alone = torch.cat([F.rms_norm(x[i : i + 1], (x.shape[-1],), eps=EPS) for i in range(len(x))])
        assert not torch.equal(stock_batch, stock_alone)
        for n in (4097, 151936):
            ours_batch = torch.ops.bi.rms_norm(x[:, :n], None, EPS)
            for i in range(len(x)):
                ours_alone = torch.ops.bi.rms_norm(x[i : i + 1, :n], None, EPS)
                assert all(torch.equal(batch[i : i + 1], alone) for batch, alone in zip(ours_batch, ours_alone))


def test_control_written_out_layer_norm_is_batch_variant_where_ours_is_not():
    """The check above can fail. Stock aten.native_layer_norm kept every row's bits on the 2-thread development CPU
    (widths 7 to 151936, fp32 and bf16, measured), so the control is LayerNorm written out with stock means, as a
    model or a decomposition computes it: on 151936-wide fp32 rows with two threads a row alone gets other bits
    than in the batch (the row is split across threads only when it is alone), and bi.layer_norm does not."""
    x = torch.randn(32, 151936, generator=torch.Generator().manual_seed(0))

    def written_out(t):
        centred = t - t.mean(-1, keepdim=True)
        return centred * torch.rsqrt(centred.square().mean(-1, keepdim=True) + EPS)

    with cpu_threads(2):
        assert not torch.equal(written_out(x), torch.cat([written_out(x[i : i + 1]) for i in range(len(x))]))
        for n in (4097, 151936):
            ours_batch = torch.ops.bi.layer_norm(x[:, :n], None, None, EPS)
            for i in range(len(x)):
                ours_alone = torch.ops.bi.layer_norm(x[i : i + 1, :n], None, None, EPS)
                assert all(torch.equal(batch[i : i + 1], alone) for batch, alone in zip(ours_batch, ours_alone))


# ---------------------------------------------------------------- errors


def test_bad_inputs_raise_bi_input_error():
    x = torch.randn(4, 64)
    cases = [
        ("rms_norm", (x.to(torch.float8_e4m3fn), None, EPS), "float8_e4m3fn"),
        ("rms_norm", (x.to(torch.int32), None, EPS), "int32"),
        ("rms_norm", (x.double(), None, EPS), "float64"),
        ("rms_norm", (torch.tensor(1.0), None, EPS), "at least one dim"),
        ("rms_norm", (x, torch.randn(63), EPS), "weight must have shape [64]"),
        ("rms_norm", (x, torch.randn(2, 64), EPS), "weight must have shape [64]"),
        ("rms_norm", (x, torch.randn(64).to(torch.float8_e4m3fn), EPS), "float8_e4m3fn"),
        ("rms_norm", (x, torch.randn(128)[::2], EPS), "layout contract"),
        ("rms_norm", (torch.randn(64, 4).t(), None, EPS), "layout contract"),
        ("add_rms_norm", (x, torch.randn(4, 32), None, EPS), "same shape and dtype"),
        ("add_rms_norm", (x, x.half(), None, EPS), "same shape and dtype"),
        ("add_rms_norm", (x, torch.randn(64, 4).t(), None, EPS), "layout contract"),
        ("layer_norm", (x.double(), None, None, EPS), "float64"),
        ("layer_norm", (x, None, torch.randn(63), EPS), "bias must have shape [64]"),
        ("layer_norm", (x, torch.randn(64), torch.randn(64).to(torch.int32), EPS), "int32"),
        ("layer_norm", (x, None, torch.randn(128)[::2], EPS), "layout contract"),
        ("layer_norm", (torch.randn(64, 4).t(), None, None, EPS), "layout contract"),
    ]
    for name, args, needle in cases:
        with pytest.raises(BIInputError) as info:
            getattr(torch.ops.bi, name)(*args)
        message = str(info.value)
        assert f"bi::{name}:" in message and needle in message, message
        assert "shape=" in message and "stride=" in message and "dtype=" in message, message


def test_eps_tensor_overloads_read_a_traced_float():
    """The eps_tensor overloads (what passes/written_rms_norm.py writes where torch.compile made the epsilon a 0-dim
    CPU tensor input) equal the float ones bitwise, fp64 and fp32 epsilons alike; any other eps is refused by name."""
    x, weight = torch.randn(5, 64).bfloat16(), torch.randn(64).bfloat16()
    for eps in (torch.tensor(1e-6, dtype=torch.float64), torch.tensor(1e-6)):
        got, want = torch.ops.bi.rms_norm.eps_tensor(x, weight, eps), torch.ops.bi.rms_norm(x, weight, 1e-6)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        got = torch.ops.bi.add_rms_norm.eps_tensor(x, x, weight, eps)
        want = torch.ops.bi.add_rms_norm(x, x, weight, 1e-6)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    for eps, needle in ((torch.ones(1), "shape=(1,)"), (torch.tensor(1), "dtype=torch.int64")):
        for name, args in (("rms_norm", (x, weight)), ("add_rms_norm", (x, x, weight))):
            with pytest.raises(BIInputError) as info:
                getattr(torch.ops.bi, name).eps_tensor(*args, eps)
            assert f"bi::{name}.eps_tensor: eps must be a float, or a 0-dim floating CPU tensor" in str(info.value)
            assert needle in str(info.value)


# ---------------------------------------------------------------- torch.compile


def test_compiled_with_dynamic_batch_matches_eager_without_recompiling():
    from torch._dynamo.testing import CompileCounterWithBackend

    def step(x, residual, weight):
        y, rstd, s = torch.ops.bi.add_rms_norm(x, residual, weight, EPS)
        return torch.ops.bi.rms_norm(y * 2, weight, EPS)[0], rstd, s

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")  # Inductor: see the GPU test
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    weight = torch.randn(96)
    for m in (2, 3, 17, 64):
        x, residual = torch.randn(m, 96), torch.randn(m, 96)
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(residual, 0)
        for got, want in zip(compiled(x, residual, weight), step(x, residual, weight)):
            assert torch.equal(got, want)
    assert counter.frame_count == 1


# ---------------------------------------------------------------- the Triton kernel (interpreter on CPU)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees inf - inf
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 13, 768, 16500])  # packed rows, an odd width, one chunk, the looped path
def test_layer_norm_kernel_matches_reference_and_is_row_invariant(triton_device, dtype, n):
    from bi_compile.kernels.rms_norm import layer_norm

    rows = 40 if n <= 768 else 4
    x = (torch.randn(rows, n, device=triton_device) * 3 + 5).to(dtype)
    weight, bias = torch.randn(n, device=triton_device), torch.randn(n, device=triton_device).to(dtype)
    out = layer_norm(x, weight, bias, EPS)
    assert_layer_norm_matches_reference(x.cpu(), weight.cpu(), bias.cpu(), *(t.cpu() for t in out))
    for start, m in ((0, 1), (3, 2), (1, rows - 1)):
        part = layer_norm(x[start : start + m], weight, bias, EPS)
        assert all(torch.equal(whole[start : start + m], sub) for whole, sub in zip(out, part))
    x[1, 0] = float("inf")
    x[2, -1] = float("nan")
    out = layer_norm(x, None, None, EPS)
    assert_layer_norm_matches_reference(x.cpu(), None, None, *(t.cpu() for t in out))
    assert out[0][1:3].isnan().all()
    head_split = torch.randn(3, 3 * n, device=triton_device).to(dtype)[:, : 2 * n].view(3, 2, n)
    out = layer_norm(head_split, None, bias, EPS)
    assert torch.equal(out[0][1, 1], layer_norm(head_split[1, 1], None, bias, EPS)[0])
    assert_layer_norm_matches_reference(head_split.cpu(), None, bias.cpu(), *(t.cpu() for t in out))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees inf - inf
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [1, 128, 300, 16500])  # packed rows, one padded chunk, the looped path
def test_kernel_matches_reference_and_is_row_invariant(triton_device, dtype, n):
    from bi_compile.kernels.rms_norm import add_rms_norm, rms_norm

    rows = 40 if n <= 300 else 4
    x1 = torch.randn(rows, n, device=triton_device).to(dtype)
    x2 = torch.randn(rows, n, device=triton_device).to(dtype)
    weight = torch.randn(n, device=triton_device)
    y, rstd, s = add_rms_norm(x1, x2, weight, EPS)
    assert torch.equal(s, x1 + x2)
    assert_matches_reference(s.cpu(), weight.cpu(), y.cpu(), rstd.cpu())
    for start, m in ((0, 1), (3, 2), (1, rows - 1)):
        part = add_rms_norm(x1[start : start + m], x2[start : start + m], weight, EPS)
        for whole, sub in zip((y, rstd, s), part):
            assert torch.equal(whole[start : start + m], sub)
    x1[1, 0] = float("inf")
    x1[2, -1] = float("nan")
    y, rstd = rms_norm(x1, weight, EPS)
    assert_matches_reference(x1.cpu(), weight.cpu(), y.cpu(), rstd.cpu())
    head_split = torch.randn(3, 3 * n, device=triton_device).to(dtype)[:, : 2 * n].view(3, 2, n)
    y, rstd = rms_norm(head_split, None, EPS)
    assert torch.equal(y[1, 1], rms_norm(head_split[1, 1], None, EPS)[0])
    assert_matches_reference(head_split.cpu(), None, y.cpu(), rstd.cpu())


def test_op_triton_path_layouts(triton_device):
    """The op's Triton entry (checks, views, launch) on the layouts the CPU tests use."""
    from bi_compile.ops.norm import _add_rms_norm_triton, _rms_norm_triton

    qkv = torch.randn(5, 3 * 4 * 16, device=triton_device)
    for x in (qkv[:, : 4 * 16].view(5, 4, 16), torch.randn(6, 4100, device=triton_device)[:, :4097],
              torch.randn(1, 300, device=triton_device).expand(7, 300), torch.randn(0, 64, device=triton_device)):
        weight = torch.randn(x.shape[-1], device=triton_device)
        y, rstd = _rms_norm_triton(x, weight, EPS)
        assert_matches_reference(x.cpu(), weight.cpu(), y.cpu(), rstd.cpu())
        y, rstd, s = _add_rms_norm_triton(x, x, weight, EPS)
        assert torch.equal(s, x + x)
        assert_matches_reference(s.cpu(), weight.cpu(), y.cpu(), rstd.cpu())
    y, rstd = _rms_norm_triton(torch.randn(3, 0, device=triton_device), None, EPS)
    assert y.shape == (3, 0) and rstd.isnan().all()
    with pytest.raises(BIInputError, match="layout contract"):
        _rms_norm_triton(torch.randn(64, 4, device=triton_device).t(), None, EPS)


def test_layer_norm_op_triton_path_layouts(triton_device):
    from bi_compile.ops.norm import _layer_norm_triton

    qkv = torch.randn(5, 3 * 4 * 16, device=triton_device)
    for x in (qkv[:, : 4 * 16].view(5, 4, 16), torch.randn(6, 4100, device=triton_device)[:, :4097],
              torch.randn(1, 300, device=triton_device).expand(7, 300), torch.randn(0, 64, device=triton_device)):
        weight, bias = torch.randn(x.shape[-1], device=triton_device), torch.randn(x.shape[-1], device=triton_device)
        out = _layer_norm_triton(x, weight, bias, EPS)
        assert_layer_norm_matches_reference(x.cpu(), weight.cpu(), bias.cpu(), *(t.cpu() for t in out))
    y, mean, rstd = _layer_norm_triton(torch.randn(3, 0, device=triton_device), None, None, EPS)
    assert y.shape == (3, 0) and rstd.isnan().all()
    with pytest.raises(BIInputError, match="layout contract"):
        _layer_norm_triton(torch.randn(64, 4, device=triton_device).t(), None, None, EPS)


def test_planned_launch_is_the_unplanned_one(triton_device, monkeypatch):
    """The ops' launch planned once per layout (ops.norm._triton_plan) gives the kernel's unplanned bits, takes the
    unplanned path where the plan cannot serve (misaligned data, rows that need a copy), and plans a layout once."""
    from bi_compile.kernels import rms_norm as kernels
    from bi_compile.ops import norm as ops

    unplanned_launch, unplanned = kernels._launch, []
    monkeypatch.setattr(kernels, "_launch", lambda *args: unplanned.append(1) or unplanned_launch(*args))
    buffer = torch.randn(8 * 256 + 1, device=triton_device)
    layouts = {  # name: (x, whether the plan serves it)
        "contiguous": (torch.randn(6, 256, device=triton_device), True),
        "head split": (torch.randn(5, 3 * 4 * 16, device=triton_device)[:, : 4 * 16].view(5, 4, 16), True),
        "misaligned": (buffer[1:].view(8, 256), False),
        "rows need a copy": (torch.randn(4, 3, 5, 64, device=triton_device).permute(1, 0, 2, 3), False),
    }
    for name, (x, planned) in layouts.items():
        weight, bias = torch.randn(x.shape[-1], device=triton_device), torch.randn(x.shape[-1], device=triton_device)
        cases = (
            (lambda: ops._rms_norm_triton(x, weight, EPS), lambda: kernels.rms_norm(x, weight, EPS)),
            (lambda: ops._add_rms_norm_triton(x, x, weight, EPS), lambda: kernels.add_rms_norm(x, x, weight, EPS)),
            (lambda: ops._layer_norm_triton(x, weight, bias, EPS), lambda: kernels.layer_norm(x, weight, bias, EPS)),
        )
        for op_call, kernel_call in cases:
            unplanned.clear()
            out = op_call()
            assert unplanned == ([] if planned else [1]), name
            assert all(torch.equal(a, b) for a, b in zip(out, kernel_call(), strict=True)), name
            plans = len(ops._triton_plan.memo)
            op_call()
            assert len(ops._triton_plan.memo) == plans, name


def test_compiled_norm_replays_run_no_checks_or_planning(triton_device, monkeypatch):
    """A compiled graph of the norm ops, replayed with batch sizes it has met, runs neither the input checks nor the
    planning (both memoized on the inputs' metadata; the fake impls checked the graph at trace time), and keeps
    the bits of its first calls. On the CPU the Triton implementation stands in for the CPU path."""
    import warnings

    import torch._dynamo.testing

    from bi_compile.kernels import rms_norm as kernels
    from bi_compile.ops import library
    from bi_compile.ops import norm as ops

    calls = []

    def counted(fn):
        return lambda *args, **kwargs: calls.append(fn.__name__) or fn(*args, **kwargs)

    monkeypatch.setattr(library.Layout, "accepts", counted(library.Layout.accepts))
    monkeypatch.setattr(kernels, "plan_norm", counted(kernels.plan_norm))
    for memoized in (ops._check, ops._triton_plan, library.check_layout):
        memoized.memo.clear()
    weight = torch.randn(64, device=triton_device)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor" if triton_device == "cuda" else "aot_eager")

    def step(x, residual):
        y, _, s = torch.ops.bi.add_rms_norm(x, residual, weight, EPS)
        return torch.ops.bi.rms_norm(y.view(-1, 4, 16), None, EPS)[0], s

    with torch.library._scoped_library("bi", "IMPL") as lib:
        if triton_device == "cpu":
            with warnings.catch_warnings():  # "Overriding a previously registered kernel": that is the point
                warnings.simplefilter("ignore", UserWarning)
                lib.impl("add_rms_norm", ops._add_rms_norm_triton, "CPU")
                lib.impl("rms_norm", ops._rms_norm_triton, "CPU")
        compiled = torch.compile(step, backend=counter, dynamic=True)
        torch._dynamo.reset()
        inputs = [(torch.randn(m, 64, device=triton_device), torch.randn(m, 64, device=triton_device)) for m in (3, 9)]
        first = [compiled(*args) for args in inputs]
        assert "plan_norm" in calls and "accepts" in calls
        calls.clear()
        again = [compiled(*args) for args in inputs for _ in range(2)]
    assert calls == []
    assert all(torch.equal(a, b) for outs, more in zip(first, again[::2]) for a, b in zip(outs, more))


# ---------------------------------------------------------------- GPU


GPU_BATCHES = (1, 2, 3, 5, 16, 17, 64, 100, 255, 1024, 4097, 8192)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1024, 4096, 151936])
def test_gpu_batch_invariance(dtype, n):
    base1 = torch.randn(8192 + 80, n, device="cuda", dtype=dtype)
    base2 = torch.randn(8192 + 80, n, device="cuda", dtype=dtype)
    weight = torch.randn(n, device="cuda")
    for start in (0, 3, 77):
        whole = torch.ops.bi.add_rms_norm(base1[start : start + 8192], base2[start : start + 8192], weight, EPS)
        assert torch.equal(whole[2], base1[start : start + 8192] + base2[start : start + 8192])
        for m in GPU_BATCHES:
            part = torch.ops.bi.add_rms_norm(base1[start : start + m], base2[start : start + m], weight, EPS)
            for full, sub in zip(whole, part):
                assert torch.equal(full[:m], sub), (n, dtype, start, m)
        whole = torch.ops.bi.rms_norm(base1[start : start + 8192], weight, EPS)
        for m in GPU_BATCHES:
            part = torch.ops.bi.rms_norm(base1[start : start + m], weight, EPS)
            assert all(torch.equal(full[:m], sub) for full, sub in zip(whole, part)), (n, dtype, start, m)
    y, rstd = torch.ops.bi.rms_norm(base1[:64], weight, EPS)
    assert_matches_reference(base1[:64].cpu(), weight.cpu(), y.cpu(), rstd.cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [768, 2560, 4097, 8192, 20000])  # GPT-2, Phi-2, an odd width, the looped path
def test_gpu_layer_norm_batch_invariance(dtype, n):
    base = (torch.randn(8192 + 80, n, device="cuda") * 3 + 1).to(dtype)
    weight, bias = torch.randn(n, device="cuda", dtype=dtype), torch.randn(n, device="cuda", dtype=dtype)
    for start in (0, 3, 77):
        whole = torch.ops.bi.layer_norm(base[start : start + 8192], weight, bias, EPS)
        for m in GPU_BATCHES:
            part = torch.ops.bi.layer_norm(base[start : start + m], weight, bias, EPS)
            assert all(torch.equal(full[:m], sub) for full, sub in zip(whole, part)), (n, dtype, start, m)
    out = torch.ops.bi.layer_norm(base[:64], weight, bias, EPS)
    assert_layer_norm_matches_reference(base[:64].cpu(), weight.cpu(), bias.cpu(), *(t.cpu() for t in out))


@pytest.mark.gpu
@pytest.mark.parametrize("n", [4096, 4097])
def test_gpu_same_row_in_any_buffer(n):
    weight = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    assert_same_rows_in_any_buffer(lambda rows: torch.ops.bi.rms_norm(rows, weight, EPS)[0], n)
    assert_same_rows_in_any_buffer(lambda rows: torch.ops.bi.layer_norm(rows, weight, weight, EPS)[0], n)


@pytest.mark.gpu
def test_gpu_head_split_view_matches_contiguous():
    """q/k-norm reads [T, H, D] heads cut from a fused qkv in place, with the bits of a contiguous copy."""
    qkv = torch.randn(300, (16 + 2 * 4) * 128, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(128, device="cuda", dtype=torch.bfloat16)
    for heads in (qkv[:, : 16 * 128].view(300, 16, 128), qkv[:, 16 * 128 : 20 * 128].view(300, 4, 128)):
        y, rstd = torch.ops.bi.rms_norm(heads, weight, EPS)
        assert torch.equal(y, torch.ops.bi.rms_norm(heads.contiguous(), weight, EPS)[0])
        assert torch.equal(y[7:8], torch.ops.bi.rms_norm(heads[7:8], weight, EPS)[0])


@pytest.mark.gpu
def test_gpu_control_stock_reduction_is_batch_variant():
    """The comparisons above can fail: the stock mean of squares (what an unreplaced RMSNorm computes) gives the
    first rows of a batch other bits than the same rows inside a 4096-row batch. On 2026-11-23 (torch 2.11, H100)
    row 0 of unseeded 151936-wide fp32 data kept its bits in every batch once, so the check now compares whole
    prefixes of seeded data at three widths; if stock still keeps every bit, the measured fact is a skip, and
    test_control_stock_rms_norm_is_batch_variant_where_ours_is_not is the control that shows the check can fail."""
    skip_unless_stock_is_batch_variant(lambda t: t.square().mean(-1), "stock mean of squares")


@pytest.mark.gpu
def test_gpu_control_stock_layer_norm_is_batch_variant():
    """The layer_norm comparisons can fail: stock F.layer_norm (or, where it keeps every bit, the skip says so)."""
    skip_unless_stock_is_batch_variant(lambda t: F.layer_norm(t, (t.shape[-1],)), "stock F.layer_norm")


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_replays_eager_bits():
    x1 = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    assert_graph_replays_eager_bits(lambda a, b: torch.ops.bi.add_rms_norm(a, b, weight, EPS), x1, torch.randn_like(x1))
    assert_graph_replays_eager_bits(lambda a: torch.ops.bi.layer_norm(a, weight, weight, EPS), x1)


@pytest.mark.gpu
def test_gpu_compiled_with_dynamic_batch_matches_eager():
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, w: torch.ops.bi.rms_norm(x, w, EPS), fullgraph=True)
    weight = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    for m in (2, 7, 64, 300):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        torch._dynamo.mark_dynamic(x, 0)
        assert all(torch.equal(a, b) for a, b in zip(compiled(x, weight), torch.ops.bi.rms_norm(x, weight, EPS)))
