"""bi::mm, bi::addmm, bi::bmm, bi::linear: accuracy against float64, bitwise batch invariance (with controls
that show the comparison can fail), odd shapes and strides, NaN/Inf, input errors, torch.compile and CUDA graphs.

Device-parametrized tests run on CPU here and on CUDA with ``pytest -m gpu``. The Triton kernel itself also
runs on CPU tensors under Triton's interpreter (conftest sets TRITON_INTERPRET=1 when there is no GPU).
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

import bi_compile.ops.matmul  # noqa: F401  (registers torch.ops.bi.mm/addmm/bmm/linear)
from bi_compile.kernels.device import target
from bi_compile.ops.library import BIInputError

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEVICES = ("cpu", pytest.param("cuda", marks=pytest.mark.gpu))
# max |out - ref| / max |ref| against float64 on the same (rounded) inputs: fp32 accumulation error plus one
# rounding to the output dtype (2^-24, 2^-11, 2^-8 relative).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@dataclass(frozen=True)
class MatmulOp:
    """One op under test: ``make`` builds its arguments with M rows in ``args[lhs]`` along ``row_dim``
    (the output has its rows along the same dim)."""

    name: str
    bi: Callable[..., torch.Tensor]
    stock: Callable[..., torch.Tensor]
    make: Callable[..., tuple[torch.Tensor, ...]]  # (m, k, n, dtype, device, generator)
    lhs: int = 0
    row_dim: int = 0
    kwargs: dict = field(default_factory=dict)

    def rows(self, args: tuple, rows: slice) -> tuple:
        index = (slice(None),) * self.row_dim + (rows,)
        return tuple(a[index] if i == self.lhs else a for i, a in enumerate(args))

    def out_rows(self, out: torch.Tensor, rows: slice) -> torch.Tensor:
        return out[(slice(None),) * self.row_dim + (rows,)]

    def __call__(self, args: tuple) -> torch.Tensor:
        return self.bi(*args, **self.kwargs)

    def reference(self, args: tuple) -> torch.Tensor:
        return self.stock(*(a.double() for a in args), **self.kwargs)


def randn(*shape, dtype, device, generator):
    return torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)


OPS = (
    MatmulOp("mm", torch.ops.bi.mm, torch.mm, lambda m, k, n, **kw: (randn(m, k, **kw), randn(k, n, **kw))),
    MatmulOp(
        "addmm", torch.ops.bi.addmm, torch.addmm,
        lambda m, k, n, **kw: (randn(n, **kw), randn(m, k, **kw), randn(k, n, **kw)),
        lhs=1, kwargs={"beta": 0.5, "alpha": 1.5},
    ),
    MatmulOp("bmm", torch.ops.bi.bmm, torch.bmm, lambda m, k, n, **kw: (randn(3, m, k, **kw), randn(3, k, n, **kw)), row_dim=1),
    MatmulOp("linear", torch.ops.bi.linear, F.linear, lambda m, k, n, **kw: (randn(m, k, **kw), randn(n, k, **kw), randn(n, **kw))),
)
OP_IDS = [op.name for op in OPS]
LINEAR = OPS[OP_IDS.index("linear")]


def make_args(op: MatmulOp, m: int, k: int, n: int, dtype: torch.dtype, device: str, seed: int = 0) -> tuple:
    return op.make(m, k, n, dtype=dtype, device=device, generator=torch.Generator().manual_seed(seed))


def assert_matches_reference(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype and out.shape == ref.shape and out.is_contiguous()
    finite = ref[ref.isfinite()]
    scale = finite.abs().max().item() if finite.numel() else 1.0
    torch.testing.assert_close(out.double(), ref.to(out.device), rtol=0, atol=TOLERANCE[dtype] * max(scale, 1e-30), equal_nan=True)


def variant_draws(op: MatmulOp, args: tuple, draws: int, seed: int) -> int:
    """How many of ``draws`` random (M, row) pairs give a row whose bits differ between the row computed
    alone and the same row inside a batch of the first M rows."""
    rng = random.Random(seed)
    m_max = args[op.lhs].shape[op.row_dim]
    differ = 0
    for _ in range(draws):
        m = rng.randint(1, m_max)
        row = rng.randrange(m)
        batch = op.out_rows(op(op.rows(args, slice(0, m))), slice(row, row + 1))
        alone = op(op.rows(args, slice(row, row + 1)))
        differ += not torch.equal(batch, alone)
    return differ


# ---- accuracy ----


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize(
    "m, k, n",
    [(37, 96, 80), (3, 4097, 40), (5, 64, 32001), (0, 64, 32), (1, 64, 32), (7, 0, 9), (1, 1, 1), (130, 257, 129)],
)
def test_matches_float64_reference(op, dtype, device, m, k, n):
    args = make_args(op, m, k, n, dtype, device)
    assert_matches_reference(op(args), op.reference(args), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_and_expanded_inputs(dtype, device):
    """Everything the layout contracts accept: strided rows, column-major and expanded operands, broadcast bias."""
    g = torch.Generator().manual_seed(1)
    kw = dict(dtype=dtype, device=device, generator=g)
    m, k, n = 21, 72, 40
    a = randn(m, k + 9, **kw)[:, 4 : 4 + k]  # row stride k + 9
    b_row_major = randn(k, n + 5, **kw)[:, :n]  # row stride n + 5
    b_col_major = randn(n, k, **kw).t()
    a_expanded = randn(1, k, **kw).expand(m, k)
    b_expanded = randn(1, n, **kw).expand(k, n)
    for lhs, rhs in [(a, b_row_major), (a, b_col_major), (a_expanded, b_col_major), (a, b_expanded)]:
        assert_matches_reference(torch.ops.bi.mm(lhs, rhs), torch.mm(lhs.double(), rhs.double()), dtype)
    for bias in [randn(n, **kw), randn(1, n, **kw), randn(m, 1, **kw), randn(m, n, **kw), randn((), **kw), randn(n, **kw)[None].expand(m, n)]:
        ref = torch.addmm(bias.double(), a.double(), b_col_major.double(), beta=0.25, alpha=-2.0)
        assert_matches_reference(torch.ops.bi.addmm(bias, a, b_col_major, beta=0.25, alpha=-2.0), ref, dtype)

    weight = randn(k, n, **kw).t()  # [n, k] with unit stride along n
    bias = randn(2 * n, **kw)[::2]
    x3 = randn(4, 6, k, **kw)
    for x in [x3, x3[:, 1:4], x3[1, 2], randn(2, 3, 5, k, **kw)[:, 1:]]:
        ref = F.linear(x.double(), weight.double(), bias.double())
        assert_matches_reference(torch.ops.bi.linear(x, weight, bias), ref, dtype)
        assert_matches_reference(torch.ops.bi.linear(x, weight), F.linear(x.double(), weight.double()), dtype)

    batch_a = randn(3, m, k, **kw)
    shared_b = randn(k, n, **kw).expand(3, k, n)  # batch stride 0
    transposed_b = randn(3, n, k, **kw).transpose(1, 2)
    for rhs in [shared_b, transposed_b]:
        assert_matches_reference(torch.ops.bi.bmm(batch_a, rhs), torch.bmm(batch_a.double(), rhs.double()), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_nan_and_inf_propagate_like_the_reference(op, dtype, device):
    args = list(make_args(op, 6, 32, 24, dtype, device))
    lhs = args[op.lhs].clone()
    row = (slice(None),) * op.row_dim
    lhs[row + (1, 3)] = float("nan")
    lhs[row + (2, 5)] = float("inf")
    lhs[row + (4, 0)] = -float("inf")
    args[op.lhs] = lhs
    out = op(args)
    ref = op.reference(args)
    assert out.isnan().any() and out.isinf().any()
    assert_matches_reference(out, ref, dtype)


def test_addmm_with_beta_zero_ignores_self_like_torch():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    nan_bias = torch.full((3,), float("nan"))
    out = torch.ops.bi.addmm(nan_bias, a, b, beta=0.0)
    assert not out.isnan().any()
    assert_matches_reference(out, torch.addmm(nan_bias.double(), a.double(), b.double(), beta=0.0), torch.float32)


# ---- bitwise batch invariance (CPU path) ----


INVARIANCE_CASES = [pytest.param(op, dtype, 160, 48, id=f"{op.name}-{dtype}") for op in OPS for dtype in DTYPES] + [
    # Every dtype reaches the same fp32 torch.mm: one larger shape, with the weight read column-major.
    pytest.param(LINEAR, torch.float32, 1000, 136, id="linear-large")
]


@pytest.mark.parametrize("op, dtype, k, n", INVARIANCE_CASES)
def test_cpu_rows_are_batch_invariant(op, dtype, k, n):
    """200 draws of (M in 1..512, row < M): the row alone has the same bits as inside the batch."""
    args = make_args(op, 512, k, n, dtype, "cpu", seed=2)
    assert variant_draws(op, args, draws=200, seed=3) == 0


@pytest.mark.parametrize("stock", [torch.mm, lambda a, b: F.linear(a, b.t())], ids=["torch.mm", "F.linear"])
def test_control_stock_cpu_matmul_is_not_batch_invariant(stock):
    """The same comparison catches stock CPU matmul (MKL changes kernels for M < 16 here), so a zero count
    above means something."""
    op = MatmulOp("stock", stock, stock, OPS[0].make)
    args = make_args(op, 512, 160, 48, torch.float32, "cpu", seed=2)
    assert variant_draws(op, args, draws=200, seed=3) > 0


def test_control_comparison_catches_one_ulp():
    """Independent of the CPU's BLAS: a matmul that moves a batched row by one ulp is caught."""
    def nudged_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = torch.ops.bi.mm(a, b)
        return torch.nextafter(out, torch.full_like(out, float("inf"))) if a.shape[0] > 1 else out

    op = MatmulOp("nudged", nudged_mm, torch.mm, OPS[0].make)
    args = make_args(op, 512, 160, 48, torch.float32, "cpu", seed=2)
    assert variant_draws(op, args, draws=20, seed=3) > 0


# ---- input errors ----


def _error_cases():
    x, w = torch.randn(4, 8), torch.randn(8, 3)
    fp8, ints, f64 = torch.float8_e4m3fn, torch.int32, torch.float64
    cases = {
        "bi::mm": [
            (lambda: torch.ops.bi.mm(x.to(fp8), w.to(fp8)), "float8_e4m3fn"),
            (lambda: torch.ops.bi.mm(x.to(ints), w.to(ints)), "int32"),
            (lambda: torch.ops.bi.mm(x.to(f64), w.to(f64)), "float64"),
            (lambda: torch.ops.bi.mm(x, w.bfloat16()), "one dtype"),
            (lambda: torch.ops.bi.mm(x[None], w), "rank 3"),
            (lambda: torch.ops.bi.mm(x, w[:5]), "inner dimensions differ (8 vs 5)"),
            (lambda: torch.ops.bi.mm(torch.randn(8, 4).t(), w), "stride=(1, 4)"),
            (lambda: torch.ops.bi.mm(x, torch.randn(16, 6)[::2, ::2]), "stride=(12, 2)"),
        ],
        "bi::addmm": [
            (lambda: torch.ops.bi.addmm(torch.zeros(3).to(fp8), x.to(fp8), w.to(fp8)), "float8_e4m3fn"),
            (lambda: torch.ops.bi.addmm(torch.zeros(3, dtype=ints), x, w), "int32"),
            (lambda: torch.ops.bi.addmm(torch.zeros(5), x, w), "does not broadcast"),
            (lambda: torch.ops.bi.addmm(torch.zeros(3), x, w[None]), "rank 3"),
            (lambda: torch.ops.bi.addmm(torch.zeros(3), torch.randn(8, 4).t(), w), "stride=(1, 4)"),
        ],
        "bi::bmm": [
            (lambda: torch.ops.bi.bmm(x[None].to(fp8), w[None].to(fp8)), "float8_e4m3fn"),
            (lambda: torch.ops.bi.bmm(x[None].to(f64), w[None].to(f64)), "float64"),
            (lambda: torch.ops.bi.bmm(x, w), "rank 2"),
            (lambda: torch.ops.bi.bmm(x.expand(2, 4, 8), w.expand(3, 8, 3)), "batch sizes differ"),
            (lambda: torch.ops.bi.bmm(torch.randn(2, 8, 4).transpose(1, 2), w.expand(2, 8, 3)), "stride=(32, 1, 4)"),
        ],
        "bi::linear": [
            (lambda: torch.ops.bi.linear(x.to(fp8), w.t().to(fp8)), "float8_e4m3fn"),
            (lambda: torch.ops.bi.linear(x.to(ints), w.t().to(ints)), "int32"),
            (lambda: torch.ops.bi.linear(x, w.t(), torch.zeros(3).half()), "one dtype"),
            (lambda: torch.ops.bi.linear(x, w.t()[None]), "rank 3"),
            (lambda: torch.ops.bi.linear(x, w.t(), torch.zeros(4)), "'bias' must have shape (3,)"),
            (lambda: torch.ops.bi.linear(x, torch.randn(6, 16)[::2, ::2]), "stride=(32, 2)"),
        ],
    }
    return [pytest.param(op, fn, text, id=f"{op}-{i}") for op, entries in cases.items() for i, (fn, text) in enumerate(entries)]


@pytest.mark.parametrize("op_name, call, text", _error_cases())
def test_bad_input_raises_naming_op_and_tensor(op_name, call, text):
    with pytest.raises(BIInputError) as info:
        call()
    message = str(info.value)
    assert message.startswith(op_name + ":") and text in message and "shape=" in message and "stride=" in message


# ---- torch.compile ----


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_mm_with_dynamic_batch_matches_eager_without_recompiling(device):
    """bi::mm stays one opaque node: the compiled graph takes any M, and the kernel config follows the real M.
    CUDA runs Inductor; the CPU run uses aot_eager (same tracing, fake impl and symbolic M, without Inductor's
    ~10 s CPU start-up)."""
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor" if device == "cuda" else "aot_eager")
    w = torch.randn(96, 40, device=device)

    @torch.compile(backend=counter, fullgraph=True)
    def project(x):
        return torch.relu(torch.ops.bi.mm(x, w)) + 1.0

    torch._dynamo.reset()
    for m in (5, 17, 64, 65, 257, 300):
        x = torch.randn(m, 96, device=device)
        torch._dynamo.mark_dynamic(x, 0)
        assert torch.equal(project(x), torch.relu(torch.ops.bi.mm(x, w)) + 1.0)
    assert counter.frame_count == 1


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter's tl.dot (conftest.py)")
def test_the_interpreters_dot_adds_in_k_order_whatever_the_tile_height():
    """What the CPU runs of the kernel tests rest on: under the interpreter a row's ``tl.dot`` bits do not depend on
    the tile height (conftest.py replaces Triton's numpy matmul, whose BLAS kernel can change with it), and they are
    the products added in k order onto the accumulator."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    from tests.conftest import _dot_in_k_order

    assert interpreter.InterpreterBuilder.create_dot is _dot_in_k_order
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((64, 48)).astype(np.float16), rng.standard_normal((48, 32)).astype(np.float16)
    acc = rng.standard_normal((64, 32)).astype(np.float32)

    def dot(rows: int) -> np.ndarray:
        handle = interpreter.TensorHandle
        return _dot_in_k_order(None, handle(a[:rows], tl.float16), handle(b, tl.float16),
                               handle(acc[:rows], tl.float32), None, None).data

    full = dot(64)
    assert all(np.array_equal(dot(rows), full[:rows]) for rows in (1, 16, 40))
    row = np.float32(a[5, 0]) * np.float32(b[0, 3])
    for k in range(1, 48):
        row = row + np.float32(a[5, k]) * np.float32(b[k, 3])
    assert full[5, 3] == row + acc[5, 3]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def triton_linear(request):
    """The device, with bi::linear running its Triton implementation there: on the GPU as registered, on the CPU
    under the interpreter (the Triton implementation overrides the CPU path for the test's duration)."""
    from bi_compile.ops import matmul as ops

    pytest.importorskip("triton")
    if request.param == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the Triton kernel on CPU tensors under TRITON_INTERPRET=1")
    with torch.library._scoped_library("bi", "IMPL") as lib:
        if request.param == "cpu":
            with warnings.catch_warnings():  # "Overriding a previously registered kernel": that is the point
                warnings.simplefilter("ignore", UserWarning)
                lib.impl("linear", ops._linear_triton, "CPU")
        yield request.param


def test_one_compiled_graph_launches_the_tiles_of_each_run_time_m(triton_linear, monkeypatch):
    """vLLM issue 54243: a graph compiled once for a symbolic M picks the kernel's tiles from the M of each call,
    never from the M it was traced with, and rows keep their bits whichever tiles run. The M values straddle
    tile-table edges on both tables (CPU/interpreter: 64; Hopper: 32, 64, 128, 256)."""
    import torch._dynamo.testing

    from bi_compile.kernels import matmul as kernels

    device = triton_linear
    picked = []
    choose = kernels.device_tiles
    monkeypatch.setattr(kernels, "device_tiles", lambda m, *rest: picked.append((m, choose(m, *rest))) or picked[-1][1])
    kernels.plan_matmul.cache_clear()  # launches are planned once per layout: plan these afresh
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor" if device == "cuda" else "aot_eager")
    g = torch.Generator().manual_seed(11)
    x = torch.randn(300, 96, generator=g).half().to(device)
    w = torch.randn(64, 96, generator=g).half().to(device)

    @torch.compile(backend=counter, dynamic=True, fullgraph=True)
    def project(rows):
        return torch.ops.bi.linear(rows, w) * 2.0

    torch._dynamo.reset()
    full = project(x)
    for m in (300, 5, 40, 100, 200):
        assert torch.equal(project(x[:m]), full[:m]), f"M={m}"
    assert counter.frame_count == 1
    tiles = dict(picked)
    assert sorted(tiles) == [5, 40, 100, 200, 300]
    assert len(set(tiles.values())) >= 2, tiles


def test_compiled_calls_run_no_input_checks_once_a_shape_is_known(triton_linear, monkeypatch):
    """The checks are a function of the inputs' metadata, memoized on it: replaying a compiled graph with shapes
    it has met runs none of them (the fake impl checked the graph at trace time)."""
    import torch._dynamo.testing

    from bi_compile.ops import library
    from bi_compile.ops import matmul as ops

    device = triton_linear
    calls = []

    def counted(fn):
        return lambda *args, **kwargs: calls.append(fn.__name__) or fn(*args, **kwargs)

    # What the checks call when they run: the operand checks and the layout contract.
    monkeypatch.setattr(ops, "_check_operands", counted(ops._check_operands))
    monkeypatch.setattr(library.Layout, "accepts", counted(library.Layout.accepts))
    ops._check_linear.memo.clear()
    ops._linear_plan.memo.clear()
    library.check_layout.memo.clear()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor" if device == "cuda" else "aot_eager")
    w = torch.randn(64, 96).half().to(device)
    project = torch.compile(lambda rows: torch.ops.bi.linear(rows, w) + 1.0, backend=counter, dynamic=True)
    torch._dynamo.reset()
    inputs = [torch.randn(m, 96).half().to(device) for m in (7, 33)]
    first = [project(x) for x in inputs]
    assert calls, "the checks never ran"
    calls.clear()
    for _ in range(3):
        again = [project(x) for x in inputs]
    assert calls == []
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_is_refused_with_one_message_eager_and_compiled(device):
    """The memoized checks still refuse bad input on every call, eager and at trace time, with the same message."""
    x = torch.randn(4, 96, device=device)
    w = torch.randn(64, 96, device=device).half()
    messages = []
    for _ in range(2):
        with pytest.raises(BIInputError) as info:
            torch.ops.bi.linear(x, w)
        messages.append(str(info.value))
    assert messages[0] == messages[1] and "bi::linear: all tensors must have one dtype" in messages[0]
    torch._dynamo.reset()
    with pytest.raises(Exception) as info:
        torch.compile(lambda rows: torch.ops.bi.linear(rows, w), backend="aot_eager", dynamic=False)(x)
    assert messages[0] in str(info.value)


def test_linear_layouts_through_the_planned_launch(triton_linear):
    """bi::linear's Triton entry on every input layout it plans: rows of one matrix, rows of a batch of matrices
    (a slice of a 3-D input), leading dims that merge into neither (a copy), a bias; each against the same rows
    made contiguous, bitwise, and a second call with another tensor of the same layout reuses the plan."""
    from bi_compile.ops import matmul as ops

    device = triton_linear
    g = torch.Generator().manual_seed(13)
    w = torch.randn(40, 72, generator=g).half().to(device)
    bias = torch.randn(40, generator=g).half().to(device)
    base = torch.randn(2, 7, 6, 72, generator=g).half().to(device)
    inputs = {
        "2-D": base[0, 0],
        "3-D": base[0],
        "batch of matrices": base[:, :5, 0],  # [2, 5, K]: rows of a batch, not of one matrix
        "merges into neither": base[:, :3, :4],  # [2, 3, 4, K]
    }
    for name, x in inputs.items():
        for b in (None, bias):
            out = torch.ops.bi.linear(x, w, b)
            assert out.shape == (*x.shape[:-1], 40) and out.is_contiguous(), name
            assert torch.equal(out, torch.ops.bi.linear(x.contiguous(), w, b)), name
            expected = x.double() @ w.double().t() + (0 if b is None else b.double())
            torch.testing.assert_close(out.double(), expected, rtol=2e-3, atol=2e-3)
    plan = ops._linear_plan(inputs["3-D"], w, None)
    assert plan is not None and ops._linear_plan(base[1].clone(), w, None) is plan
    assert ops._linear_plan(inputs["merges into neither"], w, None) is None


# ---- the Triton kernel under the interpreter (CPU tensors) ----

interpreter_only = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton kernel on CPU tensors under TRITON_INTERPRET=1"
)


def _kernels():
    pytest.importorskip("triton")
    from bi_compile.kernels import matmul as kernels

    return kernels


def _candidates(kernels, dtype: torch.dtype) -> list:
    """Every tile config the kernel may pick for ``dtype``, whatever M, N and device (both tables; on the CPU the
    interpreter runs the TMA loads too)."""
    tables = (kernels.TILE_CANDIDATES, kernels.HOPPER_TILE_CANDIDATES)
    return list(dict.fromkeys(tiles for table in tables for _, candidates in table[dtype] for tiles in candidates))


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # the interpreter gets bf16 tl.dot wrong
@pytest.mark.parametrize("b_layout", ["row_major", "col_major", "batch_shared"])
@pytest.mark.parametrize("m, k, n", [(5, 70, 33), (130, 128, 96), (1, 64, 64), (3, 0, 5), (67, 33, 129)])
def test_interpreted_kernel_matches_reference(dtype, b_layout, m, k, n):
    kernels = _kernels()
    g = torch.Generator().manual_seed(4)
    kw = dict(dtype=dtype, device="cpu", generator=g)
    a = randn(2, m, k + 3, **kw)[..., :k]
    b = {"row_major": lambda: randn(2, k, n, **kw), "col_major": lambda: randn(2, n, k, **kw).transpose(1, 2), "batch_shared": lambda: randn(k, n, **kw).expand(2, k, n)}[b_layout]()
    bias = randn(n, **kw).expand(2, m, n)
    out = kernels.matmul(a, b, bias, alpha=1.5, beta=-0.5)
    assert_matches_reference(out, 1.5 * torch.bmm(a.double(), b.double()) - 0.5 * bias.double(), dtype)


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interpreted_kernel_rows_are_invariant_with_every_tile_config(dtype):
    """With each candidate's tiles, the first m rows have the same bits for every m (rows past M masked, several
    programs, the persistent tile loop), and in fp16 a lone row matches its row in the batch. Lone fp32 rows
    are left to the GPU: the interpreter's fp32 tl.dot is numpy's sgemm (OpenBLAS), whose result for a row
    depends on the row's position inside the tile."""
    kernels = _kernels()
    g = torch.Generator().manual_seed(5)
    a = randn(1, 150, 96, dtype=dtype, device="cpu", generator=g)
    b = randn(1, 96, 72, dtype=dtype, device="cpu", generator=g)
    rng = random.Random(6)
    for tiles in _candidates(kernels, dtype):
        full = kernels.matmul(a, b, tiles=tiles)
        for _ in range(4):
            m = rng.randint(1, 150)
            assert torch.equal(kernels.matmul(a[:, :m], b, tiles=tiles), full[:, :m])
            row = rng.randrange(150)
            if dtype == torch.float16:
                assert torch.equal(kernels.matmul(a[:, row : row + 1], b, tiles=tiles), full[:, row : row + 1])


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interpreted_tile_configs_compute_the_same_function(dtype):
    """Every candidate's tiling covers each output once, on small integers where any summation order is exact.
    (The interpreter's tl.dot is numpy's matmul, whose summation order changes with the tile shape, so
    bitwise invariance across tile configs on real data is a GPU test below.)"""
    kernels = _kernels()
    g = torch.Generator().manual_seed(7)
    a = torch.randint(-3, 4, (2, 300, 200), generator=g).to(dtype)
    b = torch.randint(-3, 4, (2, 200, 136), generator=g).to(dtype)
    expected = torch.bmm(a.double(), b.double()).to(dtype)
    for tiles in _candidates(kernels, dtype):
        assert torch.equal(kernels.matmul(a, b, tiles=tiles), expected)


def _tma_ready(kernels, a, b) -> bool:
    """Whether a launch with TMA tiles loads these operands with TMA: its plan allows it and both bases are aligned."""
    tiles = kernels.TileConfig(64, 64, 4, 3, tma=True)
    plan = kernels.plan_matmul((a.shape, a.stride()), (b.shape, b.stride()), None, a.dtype, a.device, tiles)
    return plan.tma is not None and kernels.aligned16(a) and kernels.aligned16(b)


def test_tma_ready_only_for_one_aligned_matrix():
    """TMA descriptors need one matrix (batch 1) with 16-byte aligned bases and row strides, rows not overlapping;
    otherwise the same tiles run with pointer loads. (On CUDA before Hopper, and on Ascend, never.)"""
    kernels = _kernels()
    a, w = torch.zeros(1, 5, 72, dtype=torch.float16), torch.zeros(40, 72, dtype=torch.float16)
    assert _tma_ready(kernels, a, w.t()[None]) and _tma_ready(kernels, a, w.t().contiguous()[None])
    assert not _tma_ready(kernels, a.expand(2, 5, 72), w.t()[None].expand(2, 72, 40))  # batch 2
    assert not _tma_ready(kernels, torch.zeros(1, 5, 70, dtype=torch.float16), torch.zeros(40, 70, dtype=torch.float16).t()[None])
    assert not _tma_ready(kernels, a, torch.zeros(72, 41, dtype=torch.float16)[None, :, :40])  # K-row stride 82 bytes
    assert not _tma_ready(kernels, torch.zeros(1, 5, 73, dtype=torch.float16)[..., 1:], w.t()[None])  # base off by 2 bytes
    assert not _tma_ready(kernels, torch.zeros(1, 1, 72, dtype=torch.float16).expand(1, 5, 72), w.t()[None])  # row stride 0


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m, k, n", [(5, 72, 40), (130, 200, 136)])
def test_interpreted_tma_loads_match_pointer_loads(dtype, m, k, n):
    """The descriptor path (zeros past M, N and K from the descriptor, both B layouts, bias, alpha and beta) against the
    reference and against the pointer path with the same tiles, persistent or not."""
    kernels = _kernels()
    g = torch.Generator().manual_seed(12)
    a = randn(1, m, k, dtype=dtype, device="cpu", generator=g)
    w = randn(n, k, dtype=dtype, device="cpu", generator=g)
    bias = randn(n, dtype=dtype, device="cpu", generator=g).expand(1, m, n)
    for b in (w.t()[None], w.t().contiguous()[None]):
        assert _tma_ready(kernels, a, b)
        pointer = kernels.matmul(a, b, bias, alpha=1.5, beta=-0.5, tiles=kernels.TileConfig(64, 64, 4, 3))
        assert_matches_reference(pointer, 1.5 * torch.bmm(a.double(), b.double()) - 0.5 * bias.double(), dtype)
        for persistent in (False, True):
            tiles = kernels.TileConfig(64, 64, 4, 3, tma=True, persistent=persistent)
            assert torch.equal(kernels.matmul(a, b, bias, alpha=1.5, beta=-0.5, tiles=tiles), pointer)


# ---- GPU: bitwise invariance on Qwen3 shapes, control, CUDA graphs ----

QWEN3_PROJECTIONS = [  # (K, N)
    (1024, 2048), (1024, 1024), (2048, 1024), (1024, 3072), (3072, 1024),  # Qwen3-0.6B q, k/v, o, gate/up, down
    (4096, 6144), (4096, 4096), (4096, 24576), (12288, 4096),  # Qwen3-8B qkv, o, gate_up, down
    (1024, 151936),  # Qwen3-0.6B lm_head
]
M_MAX = 8192


def _sample_ms(n: int, dtype: torch.dtype) -> list[int]:
    """M in 1..8192 on both sides of every M where the kernel's tile choice changes for this N, plus a few others."""
    from bi_compile.kernels import matmul as kernels

    device_target = target(torch.device("cuda", torch.cuda.current_device()))
    processors, table = device_target.cube_cores, kernels.tile_table(device_target)
    picks = [kernels.pick_tiles(m, n, dtype, processors, table=table) for m in range(1, M_MAX + 1)]
    edges = [m for m in range(1, M_MAX) if picks[m - 1] != picks[m]]  # picks[m - 1] is M = m
    ms = {1, 2, 3, 8, 31, 100, 1000, 4097, M_MAX} | {e + d for e in edges for d in (-1, 0, 1, 2)}
    return sorted(m for m in ms if 1 <= m <= M_MAX)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k, n", QWEN3_PROJECTIONS, ids=[f"{k}to{n}" for k, n in QWEN3_PROJECTIONS])
def test_gpu_linear_is_batch_invariant_on_qwen3_shapes(k, n, dtype):
    """Every sampled M (each tile config the kernel picks for this N) gives the rows the bits they have inside
    the 8192-row batch, at a random offset, and a lone row matches too."""
    g = torch.Generator(device="cuda").manual_seed(k + n)
    x = torch.randn(M_MAX, k, device="cuda", generator=g).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=g) / k**0.5).to(dtype)
    full = torch.ops.bi.linear(x, w)
    rng = random.Random(k * n)
    for m in _sample_ms(n, dtype):
        start = rng.randrange(M_MAX - m + 1)
        assert torch.equal(torch.ops.bi.linear(x[start : start + m], w), full[start : start + m]), f"M={m} start={start}"
        row = rng.randrange(M_MAX)
        assert torch.equal(torch.ops.bi.linear(x[row : row + 1], w), full[row : row + 1]), f"row {row} alone"


@pytest.mark.gpu
def test_gpu_control_stock_linear_is_not_batch_invariant():
    """Stock F.linear (cuBLAS) on K = N = 4096 in bf16 changes a row's bits once M >= 32 (on the H100), so the
    comparison above can fail."""
    g = torch.Generator(device="cuda").manual_seed(8)
    x = torch.randn(512, 4096, device="cuda", generator=g).bfloat16()
    w = torch.randn(4096, 4096, device="cuda", generator=g).bfloat16()
    alone = F.linear(x[:1], w)
    assert any(not torch.equal(F.linear(x[:m], w)[:1], alone) for m in (32, 64, 128, 256, 512))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_tile_configs_give_the_same_bits(dtype):
    """Forcing each candidate's tiles of both tables on one input (both B layouts, odd K, odd N) gives identical
    bits: K = 4104 takes the TMA loads on Hopper (zeros past K from the descriptor), K = 4097 cannot (rows not
    16-byte aligned) and falls back to pointer loads with the same tiles."""
    from bi_compile.kernels import matmul as kernels

    g = torch.Generator(device="cuda").manual_seed(9)
    hopper = target(torch.device("cuda", torch.cuda.current_device())).tma
    for k, n in [(4096, 4096), (4104, 1000), (4097, 1000)]:
        a = torch.randn(1, 300, k, device="cuda", generator=g).to(dtype)
        w = torch.randn(n, k, device="cuda", generator=g).to(dtype)
        for b in (w.t()[None], w.t().contiguous()[None]):
            assert _tma_ready(kernels, a, b) == (hopper and k != 4097)
            outs = [kernels.matmul(a, b, tiles=tiles) for tiles in _candidates(kernels, dtype)]
            assert all(torch.equal(outs[0], out) for out in outs[1:]), f"K={k} N={n} stride={b.stride()}"


@pytest.mark.gpu
@pytest.mark.parametrize("m", [8, 300])
def test_gpu_linear_replays_in_a_cuda_graph(m):
    g = torch.Generator(device="cuda").manual_seed(10)
    x = torch.randn(m, 1024, device="cuda", generator=g).bfloat16()
    w = torch.randn(3072, 1024, device="cuda", generator=g).bfloat16()
    bias = torch.randn(3072, device="cuda", generator=g).bfloat16()
    torch.ops.bi.linear(x, w, bias)  # compile the kernel outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.bi.linear(x, w, bias)
    for _ in range(2):
        x.copy_(torch.randn(m, 1024, device="cuda", generator=g))
        graph.replay()
        assert torch.equal(captured, torch.ops.bi.linear(x, w, bias))
