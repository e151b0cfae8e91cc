"""Pass 6, native_launch: a bi op's kernel launch put in the graph for Inductor to emit (passes/native_launch.py).

On CPU the rewritten graphs run under Triton's interpreter (conftest sets TRITON_INTERPRET=1 when there is no GPU),
with CPU added to the devices the pass serves: the launch must give the op's kernel's bits at every batch size of
one symbolic graph. The GPU tests compile it with Inductor, which lowers the launch itself.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch.fx.experimental.proxy_tensor import make_fx

import bi_compile.backend  # noqa: F401  (registers bi_ascend)
from bi_compile.kernels import rms_norm as norm_kernels
from bi_compile.ops import library
from bi_compile.passes import run_pipeline
from bi_compile.passes.native_launch import native_launch_pass

interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="runs the Triton kernel on CPU tensors under TRITON_INTERPRET=1")
KERNEL_LAUNCH = torch.ops.higher_order.triton_kernel_wrapper_functional
NATIVE = {"native_launch": True}  # bi_ascend's option (off by default until these GPU tests have passed)


@pytest.fixture
def cpu_launches(monkeypatch):
    monkeypatch.setattr(library, "NATIVE_LAUNCH_DEVICES", {"cuda", "cpu"})


def norms(x, r, w, b):
    y, rstd = torch.ops.bi.rms_norm(x, w, 1e-6)
    a, a_rstd, s = torch.ops.bi.add_rms_norm(y, r, w, 1e-5)
    ln, mean, ln_rstd = torch.ops.bi.layer_norm(s, w, b, 1e-5)
    return a * 2, s, rstd, a_rstd, ln, mean, ln_rstd


def kernel_norms(x, r, w, b):
    """The same through the kernels' own launchers (what the ops call on a GPU)."""
    y, rstd = norm_kernels.rms_norm(x, w, 1e-6)
    a, a_rstd, s = norm_kernels.add_rms_norm(y, r, w, 1e-5)
    ln, mean, ln_rstd = norm_kernels.layer_norm(s, w, b, 1e-5)
    return a * 2, s, rstd, a_rstd, ln, mean, ln_rstd


def calls(gm) -> Counter:
    """The calls in ``gm`` by target, less the layout holds of ``cond`` operands (``conds`` checks those)."""
    return Counter(str(n.target) for n in gm.graph.nodes
                   if n.op == "call_function" and n.target is not torch.ops.bi.exact_strides.default)


def conds(gm) -> list:
    """The graph's ``cond`` nodes, those in its branches too, checked for what Inductor needs of them
    (``kernels.launch.launch_cond``): a sequence of outputs (its lowering zips a cond's outputs with the node's fake
    value, so a lone tensor there would be zipped row by row, ir.Conditional.create); every dense tensor operand
    held to its traced strides by ``bi.exact_strides`` (the branches read it through them; Inductor does not fix a
    cond operand's layout); and every size symbol of a tensor operand bound by the operands as Inductor binds a
    branch's, from a bare symbol that is an operand or a tensor operand's size or stride (``s0*s1`` alone binds
    neither, and Inductor's code generation stops on it)."""
    from torch._prims_common import is_non_overlapping_and_dense_or_false

    nodes = [node for module in gm.modules() if isinstance(module, torch.fx.GraphModule)
             for node in module.graph.nodes if node.target is torch.ops.higher_order.cond]
    assert all(isinstance(node.meta["val"], (tuple, list)) for node in nodes), [node.meta["val"] for node in nodes]
    for node in nodes:
        values = [operand.meta.get("val") if isinstance(operand, torch.fx.Node) else operand
                  for operand in node.args[3]]
        tensors = [(operand, value) for operand, value in zip(node.args[3], values)
                   if isinstance(value, torch.Tensor)]
        loose = [operand for operand, value in tensors if is_non_overlapping_and_dense_or_false(value)
                 and operand.target is not torch.ops.bi.exact_strides.default]
        assert not loose, loose
        exprs = [size.node.expr for value in values
                 for size in ((*value.shape, *value.stride()) if isinstance(value, torch.Tensor) else (value,))
                 if isinstance(size, torch.SymInt)]
        bound = {expr for expr in exprs if expr.is_Symbol}
        unbound = {symbol for expr in exprs for symbol in expr.free_symbols} - bound
        assert not unbound, (node, unbound)
    return nodes


def assert_inductor_lowers(gm, inserted) -> None:
    """Every ATen op that the pass ``inserted`` in ``gm`` (and every one in the ``cond`` branches) is one that
    Inductor lowers after its decompositions have run: an op it decomposes instead has no lowering there, and its
    graph lowering stops on it ("both a fallback and a decomp"). CPU cannot run that lowering for a user's Triton
    launch, so the tests check this much of it."""
    from torch._inductor.decomposition import decompositions
    from torch._inductor.lowering import lowerings

    branches = [node for sub in gm.children() if isinstance(sub, torch.fx.GraphModule) for node in sub.graph.nodes]
    refused = {str(node.target) for node in (*inserted, *branches) if node.op == "call_function"
               and isinstance(node.target, torch._ops.OpOverload)
               and node.target in decompositions and node.target not in lowerings}
    assert not refused, refused


def inputs(rows: int, width: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, r = (torch.randn(rows, 3, width, generator=g) for _ in range(2))
    return x, r, torch.randn(width, generator=g), torch.randn(width, generator=g)


def compiled_with_native_launches(fn, *args, dim: int = 0, post_grad: bool = False):
    """``fn`` through Dynamo (``dim`` of each input marked dynamic) and aot_autograd, its graph rewritten by the
    native_launch pass (then, with ``post_grad``, by Inductor's own post-grad passes, as Inductor runs them after
    the pipeline) and run as it is: (the compiled function, the graph modules, what the pass launched)."""
    from torch._guards import detect_fake_mode
    from torch._inductor.fx_passes.post_grad import post_grad_passes
    from torch._inductor.virtualized import V

    seen = []

    def forward(gm, _inputs):
        before = set(gm.graph.nodes)
        seen.append(native_launch_pass(gm.graph))
        assert_inductor_lowers(gm, [node for node in gm.graph.nodes if node not in before])
        conds(gm)
        if post_grad:
            with V.set_fake_mode(detect_fake_mode([n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"])):
                post_grad_passes(gm, is_inference=True)
        gm.graph.lint()
        gm.recompile()
        graphs.append(gm)
        return gm

    graphs: list = []
    torch._dynamo.reset()
    for arg in args:
        torch._dynamo.mark_dynamic(arg, dim)
    compiled = torch.compile(fn, backend=aot_autograd(fw_compiler=forward, decompositions={}), fullgraph=True)
    with torch.no_grad():
        compiled(*args)
    return compiled, graphs, sum(seen, Counter())


class WithWeights(torch.nn.Module):
    """``fn(*inputs, *weights)`` with the weights as the module's parameters. Under ``dynamic=True`` Dynamo keeps a
    parameter's shape static but makes a captured plain tensor's shape symbolic, and a native launch needs a static
    row length (a model's hidden size is one)."""

    def __init__(self, fn, *weights):
        super().__init__()
        self.fn = fn
        self.names = tuple(f"weight{i}" for i in range(len(weights)))
        for name, w in zip(self.names, weights):
            self.register_parameter(name, torch.nn.Parameter(w, requires_grad=False))

    def forward(self, *inputs):  # Dynamo 2.11 cannot unpack a ParameterList with *
        return self.fn(*inputs, *[getattr(self, name) for name in self.names])


@interpreter
def test_native_norms_give_the_kernels_bits_at_every_batch(cpu_launches):
    """One graph compiled with a symbolic batch: its launches give the kernels' bits at every batch."""
    x, r, w, b = inputs(5)
    compiled, graphs, launched = compiled_with_native_launches(lambda x, r: norms(x, r, w, b), x, r)
    assert launched == {"bi.rms_norm.default": 1, "bi.add_rms_norm.default": 1, "bi.layer_norm.default": 1}
    (gm,) = graphs
    assert not any(name.startswith("bi.") for name in calls(gm)) and calls(gm)[str(KERNEL_LAUNCH)] == 3
    for rows in (2, 5, 17, 1):
        x, r, *_ = inputs(rows, seed=rows)
        with torch.no_grad():
            got = compiled(x, r)
        want = kernel_norms(x, r, w, b)
        assert all(torch.equal(g_, w_) for g_, w_ in zip(got, want)), rows
        assert len(graphs) == 1 + (rows == 1), rows  # one graph for every batch (Dynamo specialises batch 1)


def test_calls_the_launch_cannot_take_stay_op_calls(cpu_launches):
    """Rows that are not contiguous, and data 4 bytes past an aligned start, stay op calls; a view 1152 bytes into
    its storage (16-byte aligned) launches natively."""
    x, r, w, b = inputs(4)

    def strided_and_offset(x, r, w):
        strided = torch.ops.bi.rms_norm(x.transpose(0, 1), w, 1e-6)[0]  # rows of unit stride, not contiguous
        unaligned = r.flatten()[1:1 + r[1:].numel()].view(r[1:].shape)  # contiguous, one float past the start
        offset = torch.ops.bi.add_rms_norm(unaligned, unaligned, w, 1e-6)[0]
        aligned = torch.ops.bi.add_rms_norm(r[1:], r[1:], w, 1e-6)[0]
        return strided, offset, aligned

    gm = make_fx(strided_and_offset, tracing_mode="fake")(x, r, w)
    assert native_launch_pass(gm.graph) == Counter({"bi.add_rms_norm.default": 1})
    assert calls(gm)["bi.rms_norm.default"] == 1 and calls(gm)["bi.add_rms_norm.default"] == 1


def test_only_the_devices_inductor_launches_on():
    """Without the test's CPU stand-in, a CPU graph keeps its op calls (Inductor emits no Triton for CPU)."""
    gm = make_fx(norms, tracing_mode="fake")(*inputs(3))
    assert native_launch_pass(gm.graph) == Counter()


def test_pipeline_runs_it_last_and_reports_it(cpu_launches):
    """The audit sees the bi ops (so the report counts them invariant); the launches are reported apart."""
    x, r, w, b = inputs(3)
    gm = make_fx(norms, tracing_mode="fake")(x, r, w, b)
    report = run_pipeline(gm.graph, native_launch=True)
    assert report.invariant and report.counts["variant"] == report.counts["unknown"] == 0
    assert report.native_launches == {"bi.rms_norm.default": 1, "bi.add_rms_norm.default": 1,
                                      "bi.layer_norm.default": 1}
    assert "launched   1 x bi.layer_norm.default from Inductor's code" in report.format()
    plain = make_fx(norms, tracing_mode="fake")(x, r, w, b)
    assert run_pipeline(plain.graph).native_launches == {}  # off unless asked (the eager inner compiler)


def test_backend_asks_for_it_only_when_asked_and_with_inductor():
    from bi_compile.backend import BatchInvariantPass, BackendOptions

    assert BatchInvariantPass(native_launch=True).native_launch and not BatchInvariantPass().native_launch
    assert BatchInvariantPass().uuid() != BatchInvariantPass(native_launch=True).uuid()
    assert not BackendOptions.parse(None).launches_natively  # opt-in until the GPU tests below have passed
    assert BackendOptions.parse({"native_launch": True}).launches_natively
    assert not BackendOptions.parse({"native_launch": True, "inner": "eager"}).launches_natively
    # a replay of Inductor's CUDA-graph trees has no host time to save
    assert not BackendOptions.parse({"native_launch": True, "cudagraphs": True}).launches_natively
    with pytest.raises(ValueError, match="native_launch"):
        BackendOptions.parse({"native_launch": "yes"})


@pytest.mark.gpu
def test_inductor_emits_the_norm_launches_and_keeps_the_bits():
    """bi_ascend + Inductor, dynamic batch: the generated code launches the norm kernel itself (no bi op call), and
    every batch gets the bits of the op called eagerly."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    model = WithWeights(norms, *(t.cuda().bfloat16() for t in inputs(1, 1024)[2:]))
    compiled = torch.compile(model, backend="bi_ascend", dynamic=True, options=NATIVE)
    for rows in (3, 64, 301):
        x, r = (t.cuda().bfloat16() for t in inputs(rows, 1024, seed=rows)[:2])
        if rows == 3:
            got, code = run_and_get_code(compiled, x, r)
            assert not re.search(r"torch\.ops\.bi\.(rms_norm|add_rms_norm|layer_norm)", "\n".join(code))
            assert "_rms_norm_kernel" in "\n".join(code)
        else:
            got = compiled(x, r)
        want = model(x, r)
        assert all(torch.equal(g_, w_) for g_, w_ in zip(got, want)), rows


@interpreter
@pytest.mark.parametrize("hold", ["bi_exact_strides", "inductor_force_stride_order"])
def test_cond_operands_are_held_without_ordering_symbolic_strides(monkeypatch, hold):
    """A ``cond`` operand's layout is pinned by a lowering that compares symbolic strides, never orders them: torch
    2.11's Inductor orders them without a shape env and stops on "cannot determine truth value of Relational" (every
    GPU model case did, with the ``force_stride_order`` prim, the control here). Ordering is made to fail on the
    CPU's torch as it does there; the held layout is checked on a pointwise result seen through a transposed view
    (a RoPE'd query's case) at two sizes of one dynamic graph."""
    import torch._inductor.inductor_prims  # noqa: F401  (registers prims.inductor_force_stride_order)
    import torch._inductor.ir as ir
    from bi_compile.kernels.launch import lower_exact_strides

    lower_exact_strides()
    held = {"bi_exact_strides": torch.ops.bi.exact_strides,
            "inductor_force_stride_order": torch.ops.prims.inductor_force_stride_order}[hold]

    def cannot_order(*args, **kwargs):
        raise TypeError("cannot determine truth value of Relational (ordering symbolic strides)")

    monkeypatch.setattr(ir, "get_stride_order", cannot_order)

    def fn(x):
        y = (x * 2).transpose(1, 2)
        return held(y, y.stride()) + 1

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="inductor", dynamic=True)
    if hold == "inductor_force_stride_order":
        with pytest.raises(Exception, match="cannot determine truth value"):
            compiled(torch.randn(2, 5, 3, 8))
        return
    for rows in (5, 11):
        x = torch.randn(2, rows, 3, 8)
        assert torch.equal(compiled(x), (x * 2).transpose(1, 2) + 1)


def test_native_linear_picks_its_tiles_from_the_run_time_batch(cpu_launches):
    """One graph, symbolic batch: a ``cond`` per range of the tile table picks the launch when the graph runs, and
    every batch gets the bits of the kernel launched with that range's tiles."""
    from bi_compile.kernels import matmul as matmul_kernels
    from bi_compile.kernels.device import CPU_TARGET

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(40, 32, generator=g), torch.randn(40, generator=g)
    x = torch.randn(3, 5, 32, generator=g)
    compiled, graphs, launched = compiled_with_native_launches(
        lambda x: (torch.ops.bi.linear(x, w, b) * 2, torch.ops.bi.linear(x, w)), x)  # with and without a bias
    assert launched == {"bi.linear.default": 2}
    ranges = matmul_kernels.native_tile_ranges(40, torch.float32, CPU_TARGET)
    assert len({tiles for _, tiles in ranges}) > 1  # the portable fp32 table: 16-row tiles up to M = 64
    (gm,) = graphs
    assert len(conds(gm)) == 2 * (len(ranges) - 1) and not any(name.startswith("bi.") for name in calls(gm))
    for rows in (2, 12, 13, 40):  # M = rows * 5: 10 and 60 in the first range, 65 and 200 in the second
        x = torch.randn(rows, 5, 32, generator=g)
        with torch.no_grad():
            got, got_unbiased = compiled(x)
        tiles = next(tiles for max_m, tiles in ranges if rows * 5 <= max_m)
        want = matmul_kernels.matmul(x.reshape(1, -1, 32), w.t()[None], b.expand(rows * 5, 40)[None], tiles=tiles)
        assert torch.equal(got, want.reshape(rows, 5, 40) * 2), rows
        want = matmul_kernels.matmul(x.reshape(1, -1, 32), w.t()[None], None, tiles=tiles)
        assert torch.equal(got_unbiased, want.reshape(rows, 5, 40)), rows
    assert len(graphs) == 1


def test_size_symbols_come_from_a_tensor_input_where_no_symbol_is_one(cpu_launches):
    """An exported graph, whose inputs are tensors only (Dynamo's graphs take their sizes as inputs too): the launch
    ``cond``s get their bare symbols from a ``sym_size`` of the input that has them as a dimension, inserted once and
    only where a launch uses it, and the graph still gives the kernel's bits at every batch (the Triton op's: the CPU
    op is torch.mm on row tiles, whose bits are the CPU BLAS's)."""
    from bi_compile.ops import matmul as matmul_ops

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(40, 32, generator=g), torch.randn(40, generator=g)
    rows = torch.export.Dim("rows", min=2)
    gm = torch.export.export(WithWeights(lambda x, w: torch.ops.bi.linear(x, w, b) * 2, w),
                             (torch.randn(3, 5, 32, generator=g),), dynamic_shapes=(({0: rows},),)).module()
    assert not any(isinstance(node.meta.get("val"), torch.SymInt)
                   for node in gm.graph.nodes if node.op == "placeholder")

    def sizes():
        return [node for node in gm.graph.nodes if node.target is torch.ops.aten.sym_size.int]

    before = sizes()
    assert native_launch_pass(gm.graph) == {"bi.linear.default": 1}
    gm.recompile()
    inserted = [node for node in sizes() if node not in before and node.args[0].op == "placeholder"]
    assert len(inserted) == 1 and inserted[0].users and conds(gm)
    for batch in (2, 40):
        x = torch.randn(batch, 5, 32, generator=g)
        assert torch.equal(gm(x), matmul_ops._linear_triton(x, w, b) * 2), batch


@pytest.mark.parametrize("layout", ["conv1d_weight", "linear_weight_transposed"])
def test_native_addmm_launches_as_a_linear_with_run_time_tiles(cpu_launches, layout):
    """``bias + x @ W`` (GPT-2's Conv1D: W [K, N] contiguous; or a linear's [N, K] weight transposed) launches the
    matmul kernel over the weight in place, with the tiles of the run-time M's range and the bits of that launch;
    other beta, alpha or bias shapes stay op calls."""
    from bi_compile.kernels import matmul as matmul_kernels
    from bi_compile.kernels.device import CPU_TARGET

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 40, generator=g) if layout == "conv1d_weight" else torch.randn(40, 32, generator=g).t()
    b = torch.randn(40, generator=g)
    compiled, graphs, launched = compiled_with_native_launches(
        lambda x: torch.ops.bi.addmm(b, x.reshape(-1, 32), weight).reshape(*x.shape[:-1], 40),
        torch.randn(3, 5, 32, generator=g))
    assert launched == {"bi.addmm.default": 1}
    ranges = matmul_kernels.native_tile_ranges(40, torch.float32, CPU_TARGET)
    (gm,) = graphs
    assert len(conds(gm)) == len(ranges) - 1 and not any(name.startswith("bi.") for name in calls(gm))
    for rows in (2, 40):
        x = torch.randn(rows, 5, 32, generator=g)
        with torch.no_grad():
            got = compiled(x)
        tiles = next(tiles for max_m, tiles in ranges if rows * 5 <= max_m)
        want = matmul_kernels.matmul(x.reshape(1, -1, 32), weight[None], b.expand(rows * 5, 40)[None], tiles=tiles)
        assert torch.equal(got, want.reshape(rows, 5, 40)), rows

    def not_a_linear(x, weight, b, full_bias):
        return torch.ops.bi.addmm(b, x, weight, beta=0.5), torch.ops.bi.addmm(full_bias, x, weight)

    gm = make_fx(not_a_linear, tracing_mode="fake")(torch.randn(6, 32), weight, b, torch.randn(6, 40))
    assert native_launch_pass(gm.graph) == Counter() and calls(gm)["bi.addmm.default"] == 2


def cuda_kernel_blocks(fn, name: str) -> set[tuple[int, ...]]:
    """The thread blocks of the CUDA kernels named like ``name`` that ``fn()`` launches, from the profiler's trace
    (a Triton kernel keeps its name under every config; its block is its config's warps x 32)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        prof.export_chrome_trace(trace.name)
        events = json.load(open(trace.name))["traceEvents"]
    return {tuple(e["args"]["block"]) for e in events if e.get("cat") == "kernel" and name in e["name"]}


@pytest.mark.gpu
def test_inductor_emits_the_linear_launches_with_run_time_tiles():
    """bi_ascend + Inductor, dynamic batch: the generated code holds the matmul kernel's launches and an ``if`` per
    tile range, no bi op call; each batch launches the kernel with its range's tiles (seen in the launch's warps,
    which differ between the first and the last range here), and each gets the bits of the op called eagerly."""
    from torch._inductor.utils import run_and_get_code

    from bi_compile.kernels import matmul as matmul_kernels
    from bi_compile.kernels.device import target

    torch._dynamo.reset()
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(3072, 1024, device="cuda", generator=g).bfloat16() / 32
    model = WithWeights(torch.ops.bi.linear, w)
    compiled = torch.compile(model, backend="bi_ascend", dynamic=True, options=NATIVE)
    ranges = matmul_kernels.native_tile_ranges(3072, torch.bfloat16, target(w.device))
    assert ranges[0][1].num_warps != ranges[-1][1].num_warps, ranges  # else the warps cannot tell the tiles apart
    for rows in (3, 48, 200, 2048):
        x = torch.randn(rows, 1024, device="cuda", generator=g).bfloat16()
        if rows == 3:
            got, code = run_and_get_code(compiled, x)
            code = "\n".join(code)
            assert "torch.ops.bi.linear" not in code and "_matmul_kernel" in code and "if " in code
        tiles = next(tiles for max_m, tiles in ranges if rows <= max_m)
        assert cuda_kernel_blocks(lambda: compiled(x), "matmul") == {(tiles.num_warps * 32, 1, 1)}, rows
        assert torch.equal(compiled(x), model(x)), rows


@interpreter
def test_native_norm_reads_an_epsilon_traced_as_a_tensor(cpu_launches):
    """torch.compile(dynamic=True) traces an RMSNorm module's epsilon as a 0-dim CPU tensor input (the written_rms_norm
    pass then writes ``bi.rms_norm.eps_tensor``): the launch reads its value when the graph runs."""

    class RMSNorm(torch.nn.Module):
        def __init__(self, eps: float):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(96, generator=torch.Generator().manual_seed(1)))
            self.variance_epsilon = eps

        def forward(self, x):
            h = x.float()
            return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype)

    module = RMSNorm(1e-6)
    graphs = []

    def forward(gm, _inputs):
        report = run_pipeline(gm.graph, native_launch=True)
        graphs.append((gm, report))
        gm.recompile()
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(module, backend=aot_autograd(fw_compiler=forward, decompositions={}), dynamic=True)
    for rows, eps in ((4, 1e-6), (9, 1e-6), (9, 0.25)):
        module.variance_epsilon = eps
        x = inputs(rows, seed=rows)[0]
        with torch.no_grad():
            got = compiled(x)
        (gm, report), = graphs
        assert report.rewrites == {"written-out rmsnorm -> bi.rms_norm.eps_tensor": 1}
        assert report.native_launches == {"bi.rms_norm.eps_tensor": 1}
        assert torch.equal(got, norm_kernels.rms_norm(x, module.weight.detach(), eps)[0]), (rows, eps)


@pytest.mark.gpu
def test_inductor_reads_a_traced_epsilon_at_run_time():
    """transformers' RMSNorm under bi_ascend with dynamic=True: epsilon a tensor input, the launch Inductor emits
    reads it on each call (no bi op call in the generated code), with the op's bits."""
    from torch._inductor.utils import run_and_get_code

    class RMSNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(1024, device="cuda").bfloat16())
            self.variance_epsilon = 1e-6

        def forward(self, x):
            h = x.float()
            return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype)

    torch._dynamo.reset()
    module = RMSNorm()
    compiled = torch.compile(module, backend="bi_ascend", dynamic=True, options=NATIVE)
    for rows, eps in ((3, 1e-6), (300, 1e-6), (300, 0.25)):
        module.variance_epsilon = eps
        x = torch.randn(rows, 1024, device="cuda").bfloat16()
        with torch.no_grad():
            if rows == 3:
                got, code = run_and_get_code(compiled, x)
                assert "torch.ops.bi.rms_norm" not in "\n".join(code)
            else:
                got = compiled(x)
        assert torch.equal(got, torch.ops.bi.rms_norm(x, module.weight.detach(), eps)[0]), (rows, eps)


@interpreter
def test_inductors_post_grad_passes_reinplace_the_launches_and_keep_them(cpu_launches):
    """Inductor's own post-grad passes, run over the rewritten graph as Inductor runs them after the pipeline: the
    functional launch becomes the in-place one on its fresh outputs (no copy of them), the launches inside the
    matmul's ``cond`` branches stay, and the graph still computes the kernels' bits. (Lowering the launches needs a
    GPU: the GPU tests below.)"""
    from bi_compile.kernels import matmul as matmul_kernels
    from bi_compile.kernels.device import CPU_TARGET

    g = torch.Generator().manual_seed(0)
    w, b, norm_w = torch.randn(40, 32, generator=g), torch.randn(40, generator=g), torch.randn(40, generator=g)

    def model(x, r):
        a, _, s = torch.ops.bi.add_rms_norm(torch.ops.bi.linear(x, w, b), r, norm_w, 1e-6)
        return a, s

    x, r = torch.randn(3, 5, 32, generator=g), torch.randn(3, 5, 40, generator=g)
    compiled, (gm,), _ = compiled_with_native_launches(model, x, r, post_grad=True)
    with torch.no_grad():
        got = compiled(x, r)
    in_place = str(torch.ops.higher_order.triton_kernel_wrapper_mutation)
    assert calls(gm)[in_place] == 1 and not calls(gm)[str(KERNEL_LAUNCH)]
    assert not any("clone" in name or "copy" in name for name in calls(gm))
    branches = [module for name, module in gm.named_children() if name.startswith("bi_launch_")]
    assert branches and all(calls(branch)[in_place] == 1 for branch in branches)
    # Each launch keeps the fake inputs it was traced with, so Inductor gives it those exact strides (the launch's
    # ints were computed from them), not only their order (a padded stride would be read wrong).
    launches = [n for module in (gm, *branches) for n in module.graph.nodes if str(n.target) == in_place]
    assert launches and all("eager_input_vals" in n.meta for n in launches)
    ranges = matmul_kernels.native_tile_ranges(40, torch.float32, CPU_TARGET)
    tiles = next(tiles for max_m, tiles in ranges if 15 <= max_m)
    y = matmul_kernels.matmul(x.reshape(1, 15, 32), w.t()[None], b.expand(15, 40)[None], tiles=tiles).reshape(3, 5, 40)
    a, _, s = norm_kernels.add_rms_norm(y, r, norm_w, 1e-6)
    assert torch.equal(got[0], a) and torch.equal(got[1], s)


def python_of_ours(fn, *args, kernels: bool = False) -> Counter:
    """The bi-compile functions that one call of ``fn``, compiled already, runs, by file and name (a Triton kernel's
    body, which the interpreter runs as Python, only with ``kernels``: on a GPU it is the compiled kernel). Fails if
    the call compiles a graph (a guard failed, e.g. another grad mode): that would count the compiler's Python."""
    import inspect
    import sys

    import triton
    from torch._dynamo.utils import counters

    import bi_compile
    import bi_compile.kernels as kernels_package
    import bi_compile.passes

    roots = tuple({os.path.dirname(bi_compile.__file__), os.path.realpath(os.path.dirname(bi_compile.passes.__file__))})
    kernel_bodies = set()  # (file, name): the interpreter runs a rewritten copy of the body, not its code object
    for module in (m for name, m in sys.modules.items() if name.startswith(kernels_package.__name__ + ".")):
        for value in vars(module).values():
            if isinstance(value, triton.runtime.KernelInterface):
                while not inspect.isfunction(value):  # through autotuners and heuristics to the Python function
                    value = value.fn
                kernel_bodies.add((value.__code__.co_filename, value.__name__))
    seen: Counter = Counter()

    def profile(frame, event, _arg):
        code = frame.f_code
        if (event == "call" and code.co_filename.startswith(roots)
                and (kernels or (code.co_filename, code.co_name) not in kernel_bodies)):
            seen[f"{os.path.basename(code.co_filename)}:{code.co_name}"] += 1

    compiled_before = counters["stats"]["unique_graphs"]
    sys.setprofile(profile)
    try:
        fn(*args)
    finally:
        sys.setprofile(None)
    assert counters["stats"]["unique_graphs"] == compiled_before, "the call compiled a graph"
    return seen


def norms_and_linear(x, r, norm_w, w, b):
    a, _, s = torch.ops.bi.add_rms_norm(torch.ops.bi.linear(x, w, b), r, norm_w, 1e-6)
    return torch.ops.bi.rms_norm(a, norm_w, 1e-6)[0], s


@interpreter
def test_a_native_graph_runs_no_python_of_ours(cpu_launches):
    """Issue 21's check that a compiled graph holds no per-call Python checks: a call of the rewritten graph runs
    not one bi-compile function (no op, no input check, no launcher), but for the eager form of the layout holds
    on its ``cond`` operands, which Inductor lowers (the GPU test below runs Inductor's code). Control: the same
    graph with its op calls runs the ops' Python on every call."""
    g = torch.Generator().manual_seed(0)
    norm_w, w, b = torch.randn(40, generator=g), torch.randn(40, 32, generator=g), torch.randn(40, generator=g)
    x, r = torch.randn(6, 32, generator=g), torch.randn(6, 40, generator=g)
    compiled, _, launched = compiled_with_native_launches(lambda x, r: norms_and_linear(x, r, norm_w, w, b), x, r)
    assert launched == {"bi.linear.default": 1, "bi.add_rms_norm.default": 1, "bi.rms_norm.default": 1}
    x, r = torch.randn(9, 32, generator=g), torch.randn(9, 40, generator=g)
    with torch.no_grad():  # the grad mode the graph was compiled in (another one recompiles)
        assert set(python_of_ours(compiled, x, r)) <= {"launch.py:_exact_strides"}

        torch._dynamo.reset()
        for t in (x, r):
            torch._dynamo.mark_dynamic(t, 0)
        op_calls = torch.compile(lambda x, r: norms_and_linear(x, r, norm_w, w, b), backend="aot_eager",
                                 fullgraph=True)
        op_calls(x, r)
        ran = python_of_ours(op_calls, x, r)
    assert any(name.startswith(("matmul.py", "norm.py")) for name in ran), ran


@pytest.mark.gpu
def test_inductors_code_runs_no_python_of_ours():
    """The same on a GPU through bi_ascend + Inductor, dynamic batch: after the first call, a call of the compiled
    graph (new batch sizes included) runs no bi-compile function; control: without the option it runs the ops'."""
    g = torch.Generator(device="cuda").manual_seed(0)
    norm_w, b = (torch.randn(1024, device="cuda", generator=g).bfloat16() for _ in range(2))
    w = torch.randn(1024, 1024, device="cuda", generator=g).bfloat16() / 32
    model = WithWeights(norms_and_linear, norm_w, w, b)

    for options, native in ((NATIVE, True), (None, False)):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="bi_ascend", dynamic=True, options=options)
        with torch.no_grad():
            for rows in (3, 64):
                compiled(*(torch.randn(rows, 1024, device="cuda", generator=g).bfloat16() for _ in range(2)))
            x, r = (torch.randn(301, 1024, device="cuda", generator=g).bfloat16() for _ in range(2))
            ran = python_of_ours(compiled, x, r)
            assert (ran == Counter()) if native else ran, ran
            assert all(torch.equal(got, want) for got, want in zip(compiled(x, r), model(x, r)))


@interpreter
def test_native_attention_takes_the_run_time_schedule(cpu_launches):
    """``bi.attention`` launched natively in one graph with a symbolic batch: few (sequence, kv head) pairs take the
    split-key branch of its ``cond`` and many the single-program one, as the op's own plan would, each with the
    kernel's bits; GQA with a bool padding mask, and causal without one."""
    from bi_compile.kernels import attention as attention_kernels

    g = torch.Generator().manual_seed(0)
    kv_len = 600  # two 512-key splits

    def model(q, k, v, mask):
        padded = torch.ops.bi.attention(q, k, v, mask, 0.0, False, None, True)
        causal = torch.ops.bi.attention(q, k[:, :, :3], v[:, :, :3], None, 0.0, True, 0.5, True)
        return padded * 2, causal

    def operands(batch):
        q = torch.randn(batch, 3, 4, 16, generator=g).transpose(1, 2)  # [B, H, L, D] viewed from [B, L, H, D]
        k, v = (torch.randn(batch, 2, kv_len, 16, generator=g) for _ in range(2))
        mask = torch.rand(batch, 1, 3, kv_len, generator=g) > 0.2
        return q, k, v, mask

    compiled, graphs, launched = compiled_with_native_launches(model, *operands(3))
    assert launched == {"bi.attention.default": 2}
    (gm,) = graphs
    assert not any(name.startswith("bi.") for name in calls(gm))
    assert len(conds(gm)) == 2
    schedules = set()
    for batch in (2, 3, 5):  # 2 kv heads a sequence: 4 and 6 programs split the keys (4 SMs), 10 do not
        q, k, v, mask = operands(batch)
        with torch.no_grad():
            got = compiled(q, k, v, mask)
            ran = python_of_ours(compiled, q, k, v, mask, kernels=True)
        split = attention_kernels.plan_attention(q, k, v, mask.expand(batch, 4, 3, kv_len), False).split is not None
        assert ("attention.py:_merge_splits_kernel" in ran) == split, batch  # the branch the op's plan takes
        schedules.add(split)
        want = (attention_kernels.attention(q, k, v, mask.expand(batch, 4, 3, kv_len), False, 0.25) * 2,
                attention_kernels.attention(q, k[:, :, :3], v[:, :, :3], None, True, 0.5))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), batch
    assert schedules == {True, False} and len(graphs) == 1


@pytest.mark.gpu
def test_inductor_emits_the_attention_launches_with_run_time_schedules():
    """bi_ascend + Inductor, dynamic batch and length: the generated code launches the attention kernels itself (no
    bi op call), a long cache at batch 1 takes the split-key schedule (the merge kernel runs) and a large batch the
    single-program one, and each gets the op's bits."""
    from torch._inductor.utils import run_and_get_code

    def model(q, k, v, mask):
        # The query computed in the graph (exactly: x 2), not read in place from an input: the launch takes the
        # strides it was traced with, so Inductor must lay the product out so (eager_input_vals), as it would a
        # model's RoPE output.
        return torch.ops.bi.attention(q * 2, k, v, mask, 0.0, False, None, True)

    torch._dynamo.reset()
    g = torch.Generator(device="cuda").manual_seed(0)
    # Batch and lengths symbolic, head counts and dims static, as a model's (dynamic=True would make them symbolic
    # too, and the call would stay an op call).
    compiled = torch.compile(model, backend="bi_ascend", options=NATIVE)
    merged = {}
    for batch, q_len, kv_len in ((2, 4, 2048), (1, 1, 8192), (64, 16, 1024)):
        q = torch.randn(batch, q_len, 32, 128, device="cuda", generator=g).bfloat16().transpose(1, 2)
        k, v = (torch.randn(batch, 8, kv_len, 128, device="cuda", generator=g).bfloat16() for _ in range(2))
        mask = torch.rand(batch, 1, q_len, kv_len, device="cuda", generator=g) > 0.1
        if batch == 2:  # the first call compiles the symbolic graph (later sizes of 1 get a graph of their own)
            for t, dims in ((q, (0, 2)), (k, (0, 2)), (v, (0, 2)), (mask, (0, 2, 3))):
                torch._dynamo.mark_dynamic(t, dims)
        with torch.no_grad():
            if batch == 2:
                got, code = run_and_get_code(compiled, q, k, v, mask)
                assert "torch.ops.bi.attention" not in "\n".join(code) and "_attention_kernel" in "\n".join(code)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                got = compiled(q, k, v, mask)
                torch.cuda.synchronize()
        merged[batch] = any("_merge_splits_kernel" in e.name for e in prof.events())
        assert torch.equal(got, model(q, k, v, mask)), batch
    assert merged[1] and not merged[64]


@interpreter
def test_inductors_post_grad_passes_keep_the_attention_branches(cpu_launches):
    """The attention's ``cond`` after Inductor's own post-grad passes: each branch keeps its in-place launches (the
    split one its two kernels, the other one), nothing copies their outputs, and the bits are the kernel's."""
    from bi_compile.kernels import attention as attention_kernels

    def model(q, k, v):
        return torch.ops.bi.attention(q, k, v, None, 0.0, True, None, True)

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 2, 16, generator=g), *(torch.randn(1, 2, 600, 16, generator=g) for _ in range(2))
    compiled, (gm,), _ = compiled_with_native_launches(model, q, k, v, dim=2, post_grad=True)
    with torch.no_grad():
        got = compiled(q, k, v)
    in_place = str(torch.ops.higher_order.triton_kernel_wrapper_mutation)
    branches = sorted((module for name, module in gm.named_children() if name.startswith("bi_launch_")),
                      key=lambda branch: calls(branch)[in_place])
    assert [calls(branch)[in_place] for branch in branches] == [1, 2]
    assert not any("clone" in name or "copy" in name or "functional" in name
                   for module in (gm, *branches) for name in calls(module))
    assert torch.equal(got, attention_kernels.attention(q, k, v, None, True, 0.25))


def native_pipeline(graphs: list, reports: list):
    """A torch.compile backend that runs a model's graph as benchmarks/prefill.py's bi_ascend would hand it to
    Inductor: Inductor's decompositions, then the pipeline with its native launches. Each graph is checked for
    what Inductor's lowering needs (``assert_inductor_lowers``, ``conds``), kept in ``graphs`` with its report in
    ``reports``, and run as it is."""
    from bi_compile.backend import inductor_decompositions
    from torch._inductor.fx_passes.post_grad import view_to_reshape

    def rewrite(gm, _inputs):
        reports.append(run_pipeline(gm.graph, native_launch=True))
        view_to_reshape(gm)
        assert_inductor_lowers(gm, gm.graph.nodes)
        conds(gm)
        gm.recompile()
        graphs.append(gm)
        return gm

    return aot_autograd(fw_compiler=rewrite, decompositions=inductor_decompositions())


def _tiny(family: str):
    """A 2-layer transformers config of ``family`` (SDPA), vocabulary 97, hidden size 64."""
    transformers = pytest.importorskip("transformers")
    decoder = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, attn_implementation="sdpa")
    return {"qwen3": lambda: transformers.Qwen3Config(**decoder, head_dim=16),
            "llama": lambda: transformers.LlamaConfig(**decoder),
            "gemma3": lambda: transformers.Gemma3TextConfig(**decoder, head_dim=16, sliding_window=4),
            "gpt2": lambda: transformers.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                    bos_token_id=0, eos_token_id=0, attn_implementation="sdpa"),
            "pythia": lambda: transformers.GPTNeoXConfig(
                vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                use_parallel_residual=True, attn_implementation="sdpa",
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}),
            "phi2": lambda: transformers.PhiConfig(
                vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                hidden_act="gelu_new", attn_implementation="sdpa",
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.4}),
            "starcoder2": lambda: transformers.Starcoder2Config(**decoder, sliding_window=64, use_bias=True,
                                                                 bos_token_id=0, eos_token_id=0),
            }[family]()


# What the pass launches natively in each tiny model's prefill graph, and the bi op calls it leaves.
# qwen3/llama: 7 projections and an attention a layer, and the lm_head; the q and k norms (qwen3), the first input
# norm (no residual yet), every later norm with the residual add before it. gemma3: four norms a layer and the
# final one as `bi.rms_norm` (their `1 + w` computed in the graph); its q and k norms read the query and key after
# their transpose to [B, H, L, D], whose rows are no longer evenly spaced, which the native norm does not take, so
# they stay op calls. gpt2: its Conv1D projections are `addmm`s with a [K, N] weight, launched as linears; its key
# and value are slices of the fused qkv output (16-byte aligned, as pythia's value is), which the attention reads
# through their strides. pythia and phi2 take rotary on part of each head; pythia and
# starcoder2's layer norms (two a layer) and phi2's (one, feeding attention and MLP) have biases.
NATIVE_PREFILLS = {
    "qwen3": ({"bi.linear.default": 15, "bi.attention.default": 2, "bi.rms_norm.default": 5,
               "bi.add_rms_norm.default": 4}, {}),
    "llama": ({"bi.linear.default": 15, "bi.attention.default": 2, "bi.rms_norm.default": 1,
               "bi.add_rms_norm.default": 4}, {}),
    "gemma3": ({"bi.linear.default": 15, "bi.attention.default": 2, "bi.rms_norm.default": 9},
               {"bi.rms_norm.default": 4}),
    "gpt2": ({"bi.layer_norm.default": 5, "bi.linear.default": 1, "bi.addmm.default": 8,
              "bi.attention.default": 2}, {}),
    "pythia": ({"bi.layer_norm.default": 5, "bi.linear.default": 9, "bi.attention.default": 2}, {}),
    "phi2": ({"bi.layer_norm.default": 3, "bi.linear.default": 13, "bi.attention.default": 2}, {}),
    "starcoder2": ({"bi.layer_norm.default": 5, "bi.linear.default": 13, "bi.attention.default": 2}, {}),
}


@interpreter
@pytest.mark.parametrize("family", list(NATIVE_PREFILLS))
def test_a_transformers_prefill_graph_launches_natively(cpu_launches, family):
    """A whole model, as benchmarks/prefill.py compiles it: a 2-layer transformers model, one forward with no KV
    cache, batch and length symbolic, Inductor's decompositions and then the pipeline with its native launches. The
    graph holds only ops that Inductor lowers, and the bi op calls listed above; two prompts' logits have the same
    bits in a batch of 2 as in a batch of 5, and another length gets the model's logits too."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_tiny(family)).eval()
    graphs, reports = [], []
    compiled = torch.compile(lambda ids: model(input_ids=ids, use_cache=False).logits,
                             backend=native_pipeline(graphs, reports))
    ids = torch.randint(0, 97, (5, 6), generator=torch.Generator().manual_seed(1))
    torch._dynamo.mark_dynamic(ids, (0, 1))
    with torch.no_grad():
        batched = compiled(ids)
        pair = compiled(ids[3:5])  # the same symbolic graph at another batch size
        want = model(input_ids=ids, use_cache=False).logits
        shorter = compiled(ids[:, :4].contiguous())  # the same graph at another length
        want_shorter = model(input_ids=ids[:, :4], use_cache=False).logits
    (gm,) = graphs
    (report,) = reports
    launched, left = NATIVE_PREFILLS[family]
    assert report.native_launches == launched, report.native_launches
    assert {name: n for name, n in calls(gm).items() if name.startswith("bi.")} == left, calls(gm)
    assert torch.equal(pair, batched[3:5])
    assert torch.allclose(batched, want, atol=1e-4, rtol=1e-4)
    assert torch.allclose(shorter, want_shorter, atol=1e-4, rtol=1e-4)


@interpreter
@pytest.mark.slow  # about 25 s a family on the 2-core CI machine
@pytest.mark.parametrize("family", ["qwen3", "gemma3", "gpt2"])
def test_a_transformers_decode_with_a_row_cache_launches_natively(cpu_launches, family):
    """The graphs of the GPU model suite (tests/test_models_gpu.py), on CPU: a tiny model's prefill and decode steps
    over a per-row KV cache (benchmarks/rowcache.py, bool masks, cache writes in the graph), compiled with dynamic
    shapes, Inductor's decompositions and the pipeline with native launches. Every graph holds only ops Inductor
    lowers and pins its cond operands (the checks whose controls are the tests above); the attention launches
    natively in every graph; a prompt's logits at every step are the same alone as in a batch of 3."""
    from benchmarks.rowcache import RowCache, RowStep, generate

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_tiny(family)).eval()
    reports = []
    torch._dynamo.reset()
    cache = RowCache(model.config, 3, 16, dtype=torch.float32, device="cpu")
    step = torch.compile(RowStep(model, cache), backend=native_pipeline([], reports), dynamic=True, fullgraph=True)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(97, (length,), generator=g) for length in (5, 3, 7)]
    alone = generate(step, step, cache, [prompts[1]], 4, watch=0)
    batched = generate(step, step, cache, prompts, 4, watch=1)
    assert torch.equal(alone.watched, batched.watched)
    assert reports and all(report.native_launches.get("bi.attention.default") == 2 for report in reports), reports
