"""bi::var_mean, bi::std_mean, bi::l2_norm, bi::logsumexp and bi::cumsum: float64 references, bitwise batch
invariance, layouts, NaN/Inf, errors, the Triton kernels, and the stock controls.

CPU tests run the ops' CPU path; the ``triton_device`` tests run the Triton launchers themselves (under the
Triton interpreter on CPU when there is no GPU, as conftest arranges); ``@pytest.mark.gpu`` tests need CUDA.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import bi_compile.ops  # noqa: F401  (registers torch.ops.bi.*)
from bi_compile.ops.library import BIInputError

from .row_helpers import (
    assert_graph_replays_eager_bits,
    assert_same_rows_in_any_buffer,
    batch_draws,
    cpu_threads,
    skip_unless_stock_is_batch_variant,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (rtol, atol) of outputs rounded to each dtype against the float64 reference.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


@dataclass(frozen=True)
class Op:
    bi: Callable  # (x, dim: list[int], keepdim) -> a tensor or a tuple of them
    stock: Callable  # the aten op with the same arguments (on float64 inputs: the reference)
    written_out: Callable  # (x) over the last dim, with stock sums: a model's own code, the CPU control


def _lse_written_out(t):
    """log(sum(exp(x - max))), logsumexp less its max: adding the max back rounds away the last bit it differs by."""
    return (t - t.amax(-1, keepdim=True)).exp().sum(-1).log()


OPS = {
    "var_mean": Op(lambda x, d, k: torch.ops.bi.var_mean(x, d, 1.0, k), lambda x, d, k: torch.var_mean(x, d, keepdim=k),
                   lambda t: (t - t.mean(-1, keepdim=True)).square().sum(-1) / (t.shape[-1] - 1)),
    "std_mean": Op(lambda x, d, k: torch.ops.bi.std_mean(x, d, 0.0, k),
                   lambda x, d, k: torch.std_mean(x, d, correction=0, keepdim=k),
                   lambda t: (t - t.mean(-1, keepdim=True)).square().mean(-1).sqrt()),
    "l2_norm": Op(lambda x, d, k: torch.ops.bi.l2_norm(x, d, k), lambda x, d, k: torch.linalg.vector_norm(x, 2, d, k),
                  lambda t: t.square().sum(-1).sqrt()),
    "logsumexp": Op(lambda x, d, k: torch.ops.bi.logsumexp(x, d, k), lambda x, d, k: torch.logsumexp(x, d, k),
                    _lse_written_out),
    # cumsum scans one dim and keeps it: the first of ``dim``, keepdim unused.
    "cumsum": Op(lambda x, d, k: torch.ops.bi.cumsum(x, d[0]), lambda x, d, k: torch.cumsum(x, d[0]),
                 lambda t: t @ torch.ones(t.shape[-1], t.shape[-1], dtype=t.dtype).triu()),
}
NAMES = tuple(OPS)


def draw(name: str, *shape: int, device: str = "cpu") -> torch.Tensor:
    """Random fp32 inputs; an offset mean for the variances (what a one-pass E[x^2] - mean^2 would lose), none for
    cumsum (fp16 running sums of a mean-1 row pass 65504)."""
    offset = 4.0 if name in ("var_mean", "std_mean") else 0.0
    return torch.randn(*shape, device=device) * 2 + offset


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, NaNs included (the variance of one element is 0 / 0)."""
    as_int = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def outputs(result) -> tuple[torch.Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


def reference(name: str, x: torch.Tensor, dim: list[int], keepdim: bool) -> tuple[torch.Tensor, ...]:
    """aten's outputs, except the mean of var_mean / std_mean, which is x.mean()'s: aten's Welford mean of a row of
    finite values and infs of one sign is NaN, ours that inf."""
    expected = outputs(OPS[name].stock(x, dim, keepdim))
    return (expected[0], x.mean(dim, keepdim=keepdim)) if name in ("var_mean", "std_mean") else expected


def assert_matches_float64(name: str, x: torch.Tensor, dim: list[int], keepdim: bool, result) -> None:
    """Against the reference on the input's values in float64; outputs in the input dtype, contiguous, aten's
    shapes."""
    rtol, atol = TOL[x.dtype]
    expected = reference(name, x.double(), dim, keepdim)
    for got, want in zip(outputs(result), expected, strict=True):
        assert got.dtype == x.dtype and got.shape == want.shape and got.is_contiguous()
        scale = want.abs().amax() if name == "cumsum" and want.numel() else 1.0  # a running sum may cross zero
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol * scale, equal_nan=True)


# ---------------------------------------------------------------- CPU path: values


SHAPES = [((3, 5, 64), [-1]), ((3, 5, 64), [1]), ((4, 4097), [1]), ((7, 13), [-1]), ((2, 151936), [-1]),
          ((3, 5, 64), [0, 2]), ((6,), [0])]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, shape, dim, keepdim", [
    (name, shape, dim, keepdim) for name in NAMES for shape, dim in SHAPES for keepdim in (False, True)
    if name != "cumsum" or (len(dim) == 1 and not keepdim)])  # cumsum scans one dim and keeps it
def test_matches_float64(name, dtype, shape, dim, keepdim):
    x = draw(name, *shape).to(dtype)
    assert_matches_float64(name, x, dim, keepdim, OPS[name].bi(x, dim, keepdim))


@pytest.mark.parametrize("name", NAMES)
def test_strided_transposed_and_expanded_inputs(name):
    base, row = torch.randn(6, 4100), torch.randn(1, 300)
    for x, dim in ((base[:, :4097], [-1]), (base.t(), [-1]), (base.t(), [0]), (row.expand(7, 300), [-1]),
                   (torch.randn(4, 5, 6).permute(2, 0, 1), [1])):
        result = OPS[name].bi(x, dim, False)
        assert_matches_float64(name, x, dim, False, result)
        for got, want in zip(outputs(result), outputs(OPS[name].bi(x.contiguous(), dim, False))):
            assert torch.equal(got, want)


@pytest.mark.filterwarnings("ignore:var_mean|std_mean")  # aten's warning about correction >= the row length
@pytest.mark.parametrize("name", NAMES)
def test_nan_inf_and_degenerate_rows_like_torch(name):
    x = torch.randn(6, 1000)
    x[1, 3] = float("nan")
    x[2, 4] = float("inf")
    x[3, 5], x[3, 6] = float("inf"), float("-inf")
    x[4] = float("-inf")
    for t, dim in ((x, [-1]), (torch.randn(3, 1), [-1]), (torch.randn(3, 0), [-1]), (torch.randn(0, 5), [-1])):
        for got, want in zip(outputs(OPS[name].bi(t, dim, False)), reference(name, t, dim, False)):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)


# ---------------------------------------------------------------- CPU path: batch invariance


@pytest.mark.parametrize("name", NAMES)
def test_cpu_row_alone_equals_row_in_batch(name):
    """200 draws of (M in 1..512, start, row position, row length, dtype, keepdim): bits equal to the row alone.
    Half the draws reduce dim 0 of a transposed view."""
    rng = random.Random(5)
    bases = {(n, dtype): torch.randn(600, n).to(dtype) for n in (1, 7, 128, 1000) for dtype in DTYPES}
    op = OPS[name].bi
    for start, m, pos in batch_draws(rng, 200, 600):
        x = bases[rng.choice(list(bases))]
        keepdim = rng.random() < 0.5 and name != "cumsum"
        if rng.random() < 0.5:
            batch = outputs(op(x[start : start + m], [-1], keepdim))
            alone = outputs(op(x[start + pos : start + pos + 1], [-1], keepdim))
            pairs = [(b[pos], a[0]) for b, a in zip(batch, alone)]
        else:  # rows are the columns of a transposed view
            batch = outputs(op(x.t()[:, start : start + m], [0], keepdim))
            alone = outputs(op(x.t()[:, start + pos : start + pos + 1], [0], keepdim))
            pairs = [(b[..., pos], a[..., 0]) for b, a in zip(batch, alone)]
        assert all(same_bits(b, a) for b, a in pairs), (name, start, m, pos, x.shape, x.dtype)


@pytest.mark.parametrize("name", NAMES)
def test_control_written_out_stock_form_is_batch_variant_where_ours_is_not(name):
    """The check above can fail. The stock aten ops kept every row's bits on the 2-thread development CPU (widths 7
    to 151936, fp32 and bf16, measured), so the control is each op written out with stock sums, as a model or a
    decomposition computes it (cumsum: a product with a triangle of ones): with two threads a row alone gets other
    bits than in the batch, and ours does not."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1000 if name == "cumsum" else 151936, generator=generator)
    written_out = OPS[name].written_out
    with cpu_threads(2):
        assert not torch.equal(written_out(x), torch.cat([written_out(x[i : i + 1]) for i in range(len(x))]))
        batch = outputs(OPS[name].bi(x, [-1], False))
        for i in range(len(x)):
            alone = outputs(OPS[name].bi(x[i : i + 1], [-1], False))
            assert all(torch.equal(b[i : i + 1], a) for b, a in zip(batch, alone))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_raise_bi_input_error(name):
    x = torch.randn(4, 64)
    for args, needle in (((x.to(torch.float8_e4m3fn), [-1]), "float8_e4m3fn"), ((x.to(torch.int32), [-1]), "int32"),
                         ((x.double(), [-1]), "float64"), ((x, [2]), "dim 2 out of range")):
        with pytest.raises(BIInputError) as info:
            OPS[name].bi(*args, False)
        message = str(info.value)
        assert f"bi::{name}:" in message and needle in message, message
        assert "shape=" in message and "stride=" in message and "dtype=" in message, message
    with pytest.raises(BIInputError, match="unsupported dtype argument torch.int64"):
        torch.ops.bi.cumsum(x, -1, dtype=torch.int64)


# ---------------------------------------------------------------- torch.compile


def test_compiled_with_dynamic_batch_matches_eager_without_recompiling():
    from torch._dynamo.testing import CompileCounterWithBackend

    def step(x):
        var, mean = torch.ops.bi.var_mean(x, [-1], 0.0, True)
        return ((x - mean) * torch.rsqrt(var + 1e-5), torch.ops.bi.logsumexp(x, [-1]), torch.ops.bi.l2_norm(x, [-1]),
                torch.ops.bi.cumsum(x.softmax(-1), -1))

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for m in (2, 3, 17, 64):
        x = torch.randn(m, 96)
        torch._dynamo.mark_dynamic(x, 0)
        assert all(torch.equal(got, want) for got, want in zip(compiled(x), step(x)))
    assert counter.frame_count == 1


# ---------------------------------------------------------------- the Triton kernels (interpreter on CPU)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees inf - inf and 0 / 0
@pytest.mark.filterwarnings("ignore:var_mean|std_mean")  # aten's warning about correction >= the row length
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 13, 300, 16500])  # packed rows, an odd width, one padded chunk, the looped path
def test_op_triton_path_matches_float64_and_is_row_invariant(triton_device, name, dtype, n):
    from bi_compile.ops import cumsum, reduce

    triton_op = {"var_mean": lambda x, d, k: reduce._moments_triton(False, x, d, 1.0, k),
                 "std_mean": lambda x, d, k: reduce._moments_triton(True, x, d, 0.0, k),
                 "l2_norm": lambda x, d, k: reduce._triton(reduce.L2_NORM, x, d, k),
                 "logsumexp": reduce._logsumexp_triton,
                 "cumsum": lambda x, d, k: cumsum._triton(x, d[0])}[name]
    rows = 24 if n <= 300 else 3
    x = draw(name, rows, n, device=triton_device).to(dtype)
    result = outputs(triton_op(x, [-1], False))
    assert_matches_float64(name, x.cpu(), [-1], False, tuple(t.cpu() for t in result))
    for start, m in ((0, 1), (2, 1), (1, rows - 1)):
        part = outputs(triton_op(x[start : start + m], [-1], False))
        assert all(same_bits(whole[start : start + m], sub) for whole, sub in zip(result, part))
    if n > 1:
        x[1, 0], x[2, -1] = float("inf"), float("nan")
        x[0] = float("-inf")
        for got, want in zip(outputs(triton_op(x, [-1], False)), reference(name, x.cpu().double(), [-1], False)):
            torch.testing.assert_close(got.cpu().double(), want, rtol=TOL[dtype][0], atol=TOL[dtype][1] * n,
                                       equal_nan=True)
    transposed = torch.randn(n, 5, device=triton_device).to(dtype)  # the op moves dim 0 last: a copy
    assert_matches_float64(name, transposed.cpu(), [0], False, tuple(t.cpu() for t in outputs(triton_op(transposed, [0], False))))


def test_cumsum_kernel_carries_across_chunks(triton_device):
    """A row longer than one chunk: each chunk's last running sum carries into the next, exact on small integers,
    and a row's bits are the same in any batch."""
    from bi_compile.kernels.cumsum import cumsum
    from bi_compile.kernels.reduce import RowBlocking

    chunks = RowBlocking(block=16, rows=2, fused=False, num_warps=1)
    x = torch.randint(-3, 4, (5, 100), device=triton_device).float()
    assert torch.equal(cumsum(x, torch.float32, blocking=chunks).cpu(), x.cpu().double().cumsum(-1).float())
    y = torch.randn(5, 100, device=triton_device)
    full = cumsum(y, torch.float32, blocking=chunks)
    assert torch.equal(cumsum(y[3:4], torch.float32, blocking=chunks), full[3:4])


# ---------------------------------------------------------------- GPU


GPU_BATCHES = (1, 2, 3, 5, 16, 17, 64, 100, 255, 1024, 4097, 8192)


@pytest.mark.gpu
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [768, 4097, 151936])
def test_gpu_batch_invariance(name, dtype, n):
    rows = 8192 if n < 100000 else 1024  # vocab-wide rows: 1024 of them
    base = torch.randn(rows + 80, n, device="cuda").to(dtype)
    op = OPS[name].bi
    for start in (0, 3, 77):
        whole = outputs(op(base[start : start + rows], [-1], False))
        for m in (m for m in GPU_BATCHES if m <= rows):
            part = outputs(op(base[start : start + m], [-1], False))
            assert all(torch.equal(full[:m], sub) for full, sub in zip(whole, part)), (name, n, dtype, start, m)
    assert_matches_float64(name, base[:16].cpu(), [-1], False, tuple(t.cpu() for t in outputs(op(base[:16], [-1], False))))


@pytest.mark.gpu
@pytest.mark.parametrize("name", NAMES)
def test_gpu_same_row_in_any_buffer(name):
    for n in (4096, 4097):
        assert_same_rows_in_any_buffer(lambda rows: outputs(OPS[name].bi(rows, [-1], False))[0], n)


@pytest.mark.gpu
@pytest.mark.parametrize("name", NAMES)
def test_gpu_control_stock_op_is_batch_variant(name):
    """The comparisons above can fail: the stock op gives some prefix of a batch other bits (or the skip says it kept
    every bit, the measured fact)."""
    skip_unless_stock_is_batch_variant(lambda t: outputs(OPS[name].stock(t, [-1], False))[0], f"stock {name}")


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_replays_eager_bits():
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    for name in NAMES:
        assert_graph_replays_eager_bits(lambda t: outputs(OPS[name].bi(t, [-1], False)), x)
