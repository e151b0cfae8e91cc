"""The pass pipeline on aot_autograd's functionalized ATen graphs: what it rewrites, what it leaves, and numerics."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.backends.common import aot_autograd
from torch._inductor.fx_passes.post_grad import view_to_reshape

from bi_compile.ops.library import LAYOUT_CONTRACTS
from bi_compile.passes import run_pipeline
from bi_compile.passes.fx_utils import fake_value

from . import foreign_ops

VARIANT_ATEN = {"aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten._softmax.default",
                "aten._log_softmax.default", "aten.sum.dim_IntList", "aten.mean.dim", "aten.sum.default",
                "aten.mean.default"}


def rewritten(fn, *args, dynamic=False):
    """Compile ``fn`` through aot_autograd with the pipeline on its forward graph: (graph module, report, output)."""
    seen = []

    def forward(gm, _inputs):
        seen.append((gm, run_pipeline(gm.graph)))
        view_to_reshape(gm)
        gm.recompile()
        return gm

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(fn, backend=aot_autograd(fw_compiler=forward, decompositions={}), dynamic=dynamic,
                            fullgraph=True)(*args)
    (gm, report), = seen
    return gm, report, out


def targets(gm) -> Counter:
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


@pytest.fixture(scope="module")
def npu_and_vllm_ops():
    foreign_ops.register()


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 48)
        self.down = torch.nn.Linear(48, 24, bias=False)

    def forward(self, x):  # x: [B, T, 16]
        return torch.log_softmax(self.down(F.gelu(self.up(x))), dim=-1)


def test_mlp_linears_read_weights_in_place_and_reductions_are_replaced():
    torch.manual_seed(0)
    mlp, x = MLP(), torch.randn(5, 3, 16)
    gm, report, out = rewritten(mlp, x)
    ops = targets(gm)
    assert not VARIANT_ATEN & set(ops)
    assert ops["bi.linear.default"] == 2 and ops["bi.log_softmax.default"] == 1
    assert report.rewrites == {"aten.addmm.default -> bi.linear": 1, "aten.mm.default -> bi.linear": 1,
                               "aten._log_softmax.default -> bi.log_softmax": 1}
    weights = [n.kwargs["weight"] for n in gm.graph.nodes if n.target is torch.ops.bi.linear.default]
    assert all(w.op == "placeholder" for w in weights)  # [N, K] parameters, neither transposed nor copied
    assert "aten.clone.default" not in ops and report.copied_inputs == []
    torch.testing.assert_close(out, mlp(x), rtol=1e-5, atol=1e-5)


def test_plain_matmuls_keep_their_scalars():
    def fn(a, b, bias, p, q):
        return torch.mm(a, b), torch.addmm(bias, a, b, beta=0.5, alpha=2.0), torch.bmm(p, q)

    args = (torch.randn(6, 8), torch.randn(8, 5), torch.randn(6, 5), torch.randn(3, 4, 8), torch.randn(3, 8, 2))
    gm, report, out = rewritten(fn, *args)
    ops = targets(gm)
    assert ops["bi.mm.default"] == 1 and ops["bi.addmm.default"] == 1 and ops["bi.bmm.default"] == 1
    addmm = next(n for n in gm.graph.nodes if n.target is torch.ops.bi.addmm.default)
    assert (addmm.kwargs["beta"], addmm.kwargs["alpha"]) == (0.5, 2.0)
    for got, want in zip(out, fn(*args)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_softmax_and_reductions_all_forms():
    def fn(x, ids):
        return (torch.softmax(x, 0), torch.log_softmax(x.half(), -1, dtype=torch.float32), x.sum((0, 2), keepdim=True),
                x.mean(), x.sum(), x.mean(-1, dtype=torch.float32), ids.sum(-1))

    x, ids = torch.randn(4, 6, 10), torch.randint(0, 9, (4, 6))
    gm, report, out = rewritten(fn, x, ids)
    ops = targets(gm)
    assert ops["aten.sum.dim_IntList"] == 1  # the integer sum: exact, left alone, and audited invariant
    assert not (VARIANT_ATEN - {"aten.sum.dim_IntList"}) & set(ops)
    assert report.findings == []
    for got, want in zip(out, fn(x, ids)):
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


def test_contiguous_copies_exactly_the_inputs_that_break_a_contract():
    weight = torch.nn.Parameter(torch.randn(7, 8))

    def fn(a, b, x):
        # a.t() is column-major: it breaks mm's row layout for `self`; x @ weight.t() reads the weight in place.
        return torch.mm(a.t(), b), F.linear(x, weight)

    a, b, x = torch.randn(8, 5), torch.randn(8, 3), torch.randn(3, 8)
    gm, report, out = rewritten(fn, a, b, x)
    for node in gm.graph.nodes:  # post-condition: every bi-op argument now meets its contract
        contract = LAYOUT_CONTRACTS.get(getattr(node.target, "_schema", None) and node.target._schema.name, {})
        for name, layout in contract.items():
            val = fake_value(node.kwargs.get(name))
            assert not isinstance(val, torch.Tensor) or layout.accepts(val), (node, name)
    clones = [n for n in gm.graph.nodes if n.target is torch.ops.aten.clone.default]
    mm = next(n for n in gm.graph.nodes if n.target is torch.ops.bi.mm.default)
    assert [c for c in clones if c in mm.all_input_nodes] == clones and len(clones) == sum(report.copies.values())
    assert mm.kwargs["self"] in clones and report.copied_inputs == []
    for got, want in zip(out, fn(a, b, x)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_unfuse_npu_add_rms_norm_keeps_every_used_output(npu_and_vllm_ops):
    def fn(x, residual, gamma):
        y, rstd, total = torch.ops.npu.npu_add_rms_norm(x, residual, gamma, 1e-6)
        y2, _ = torch.ops.npu.npu_rms_norm(total, gamma)
        return y, rstd, total, y2

    args = (torch.randn(4, 32), torch.randn(4, 32), torch.randn(32))
    gm, report, out = rewritten(fn, *args)
    ops = targets(gm)
    assert not any(t.startswith("npu.") for t in ops)
    assert ops["bi.add_rms_norm.default"] == 1 and ops["bi.rms_norm.default"] == 1 and "aten.add.Tensor" not in ops
    assert report.rewrites == {"npu.npu_add_rms_norm.default -> bi.add_rms_norm": 1,
                               "npu.npu_rms_norm.default -> bi.rms_norm": 1}
    for got, want in zip(out, fn(*args)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_unfuse_writes_the_add_apart_where_it_broadcasts_or_promotes(npu_and_vllm_ops):
    """bi.add_rms_norm's sum is an add of one dtype and shape; a broadcast or promoting add stays aten's, and the
    outputs still equal the pair written by hand, bit for bit."""
    def fn(x, residual, gamma):
        y, rstd, total = torch.ops.npu.npu_add_rms_norm(x, residual, gamma, 1e-6)
        return y, rstd, total

    x, gamma = torch.randn(4, 32, dtype=torch.bfloat16), torch.randn(32)
    for residual in (torch.randn(1, 32, dtype=torch.bfloat16), torch.randn(4, 32)):
        gm, report, out = rewritten(fn, x, residual, gamma)
        ops = targets(gm)
        assert "bi.add_rms_norm.default" not in ops and ops["aten.add.Tensor"] == 1 and ops["bi.rms_norm.default"] == 1
        assert report.rewrites == {"npu.npu_add_rms_norm.default -> aten.add + bi.rms_norm": 1}
        total = x + residual
        y, rstd = torch.ops.bi.rms_norm(total, gamma, 1e-6)
        for got, want in zip(out, (y, rstd, total)):
            assert torch.equal(got, want)


def test_unfuse_drops_outputs_nobody_uses(npu_and_vllm_ops):
    def fn(x, residual, gamma):
        return torch.ops.npu.npu_add_rms_norm(x, residual, gamma)[0]

    gm, report, _ = rewritten(fn, torch.randn(2, 16), torch.randn(2, 16), torch.randn(16))
    getitems = [n for n in gm.graph.nodes if n.op == "call_function" and "getitem" in str(n.target)]
    assert [n.args[1] for n in getitems] == [0]  # rstd's getitem was dead and is gone


def test_vllm_norm_forms_functional_and_mutating(npu_and_vllm_ops):
    def fn(x, residual, weight):
        normed, total = torch.ops.vllm_ir.fused_add_rms_norm(x, residual, weight, 1e-6)
        out = torch.ops.vllm_ir.rms_norm(normed, weight, 1e-6)
        x2, r2 = out.clone(), total.clone()
        torch.ops._C.fused_add_rms_norm(x2, r2, weight, 1e-6)  # in place: x2 <- norm(x2 + r2), r2 <- x2 + r2
        result = torch.empty_like(x2)
        torch.ops._C.rms_norm(result, x2, weight, 1e-6)
        return out, total, x2, r2, result

    args = (torch.randn(3, 64), torch.randn(3, 64), torch.randn(64))
    gm, report, out = rewritten(fn, *args)
    ops = targets(gm)
    assert not any(t.startswith(("vllm_ir.", "_C.")) or "auto_functionalized" in t for t in ops)
    assert ops["bi.add_rms_norm.default"] == 2 and ops["bi.rms_norm.default"] == 2 and "aten.add.Tensor" not in ops
    for got, want in zip(out, fn(*args)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rows_that_cannot_express_a_node_leave_it_for_the_audit(npu_and_vllm_ops):
    def fn(x, weight):
        return torch.ops.vllm_ir.rms_norm(x, weight, 1e-6, 32), torch.cumprod(x, -1)

    gm, report, _ = rewritten(fn, torch.randn(2, 64), torch.randn(64))
    assert "vllm_ir.rms_norm.default" in targets(gm)
    assert sorted(f.target for f in report.findings) == ["aten.cumprod.default", "vllm_ir.rms_norm.default"]
    assert all(f.kind == "variant" and "test_passes.py" in f.source for f in report.findings)


def test_audit_names_unknown_custom_ops_by_source_line():
    lib = torch.library.Library("bi_test", "FRAGMENT")
    lib.define("opaque(Tensor x) -> Tensor")
    lib.impl("opaque", lambda x: x * 2, "CompositeExplicitAutograd")
    torch.library.register_fake("bi_test::opaque", lambda x: torch.empty_like(x), lib=lib)

    def fn(x):
        return torch.ops.bi_test.opaque(x) + 1

    _, report, _ = rewritten(fn, torch.randn(3))
    (finding,) = report.findings
    assert (finding.kind, finding.target) == ("unknown", "bi_test.opaque.default")
    assert "torch.ops.bi_test.opaque(x)" in finding.source


def test_audit_counts_ops_invariant_by_construction_and_says_why(monkeypatch):
    """Another library's op is unknown until the table of order-free foreign ops lists it, or its owner declares it
    for this process (vLLM's attention op under BI_ATTN); then it is invariant, and the report says why."""
    from bi_compile.passes import audit, declare_invariant

    lib = torch.library.Library("bi_test", "FRAGMENT")
    for name in ("elementwise", "owned"):
        lib.define(f"{name}(Tensor x) -> Tensor")
        lib.impl(name, lambda x: x * 2, "CompositeExplicitAutograd")
        torch.library.register_fake(f"bi_test::{name}", lambda x: torch.empty_like(x), lib=lib)

    def fn(x):
        return torch.ops.bi_test.elementwise(x) + torch.ops.bi_test.owned(x)

    _, before, _ = rewritten(fn, torch.randn(3))
    assert sorted(f.target for f in before.findings) == ["bi_test.elementwise.default", "bi_test.owned.default"]
    monkeypatch.setitem(audit.FOREIGN_ORDER_FREE, "bi_test::elementwise", "doubles each element")
    monkeypatch.setattr(audit, "_DECLARED", {})
    declare_invariant("bi_test::owned", "its owner picked an invariant implementation")
    _, after, _ = rewritten(fn, torch.randn(3))
    assert after.findings == [] and after.counts["unknown"] == 0
    assert after.by_construction == {"bi_test.elementwise.default": "doubles each element",
                                     "bi_test.owned.default": "its owner picked an invariant implementation"}
    assert "invariant by construction: bi_test.owned.default (its owner picked" in after.format()


def tiny_qwen3(attn_implementation: str):
    """A 2-layer transformers Qwen3 (4 query heads, 2 kv heads), seeded random weights, fp32."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      attn_implementation=attn_implementation)
    torch.manual_seed(0)
    return transformers.Qwen3ForCausalLM(config).eval()


def test_qwen3_decoder_leaves_nothing_variant():
    model = tiny_qwen3("eager")
    ids = torch.randint(0, 97, (2, 7))

    def logits(ids):
        return model(ids, use_cache=False).logits

    gm, report, out = rewritten(logits, ids)
    assert report.findings == []
    assert not VARIANT_ATEN & set(targets(gm))
    assert report.rewrites["aten.mm.default -> bi.linear"] == 2 * 7 + 1  # q k v o gate up down per layer, lm_head
    torch.testing.assert_close(out, logits(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gqa", [False, True])
def test_sdpa_becomes_bi_attention(gqa):
    def fn(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    q, mask = torch.randn(2, 4, 5, 32), torch.rand(2, 1, 5, 9) > 0.3
    k, v = torch.randn(2, 2 if gqa else 4, 9, 32), torch.randn(2, 2 if gqa else 4, 9, 32)
    mask[..., 0] = True  # no fully masked row
    gm, report, out = rewritten(fn, q, k, v, mask)
    assert targets(gm)["bi.attention.default"] == 1 and report.findings == []
    torch.testing.assert_close(out, fn(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_audit_counts_exact_routing_arithmetic_as_invariant():
    """MoE routing: expert counts (histc/bincount) and integer divisions are exact whatever the order."""

    def fn(expert_ids, scores):
        counts = torch.histc(expert_ids.float(), bins=8, min=0, max=7)
        return counts, torch.bincount(expert_ids.flatten(), minlength=8), torch.floor_divide(expert_ids, 2), scores.amax(-1)

    _, report, _ = rewritten(fn, torch.randint(0, 8, (6, 2)), torch.randn(6, 8))
    assert report.findings == []


def test_written_out_rms_norm_variance_becomes_mean_square_of_the_narrow_input():
    """x.float().pow(2).mean(-1, True) (transformers' norms) and x * x: bi.mean_square reads x itself; any
    other mean stays bi.mean (a cube, or squares taken in bf16, which round unlike fp32 ones)."""

    def fn(x, y):
        return (x.float().pow(2).mean(-1, keepdim=True), (y * y).mean([-1]), x.float().pow(3).mean(-1),
                x.pow(2).mean(-1))

    x, y = torch.randn(3, 5, 64).bfloat16(), torch.randn(7, 33)
    gm, report, out = rewritten(fn, x, y)
    assert report.rewrites == {"aten.mean.dim -> bi.mean_square": 2, "aten.mean.dim -> bi.mean": 2}
    squares = [n for n in gm.graph.nodes if n.target is torch.ops.bi.mean_square.default]
    assert {fake_value(n.kwargs["self"]).dtype for n in squares} == {torch.bfloat16, torch.float32}
    assert not any(n.target is torch.ops.aten.pow.Tensor_Scalar and n.args[1] == 2 and fake_value(n).dtype == torch.float32
                   for n in gm.graph.nodes)  # the fp32 squares are gone from the graph
    for got, want in zip(out, fn(x, y)):
        torch.testing.assert_close(got, want, rtol=2e-2 if got.dtype == torch.bfloat16 else 1e-5, atol=1e-5)


class ResidualRMSNorm(torch.nn.Module):
    """transformers' residual add + RMSNorm, written out (Llama, Qwen)."""

    def __init__(self, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(hidden, dtype=dtype))
        self.variance_epsilon = 1e-6

    def forward(self, x, residual):
        total = residual + x
        h = total.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(total.dtype), total


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dynamic", [False, True])  # True: torch.compile passes the epsilon as a 0-dim tensor input
def test_written_out_rms_norm_and_its_residual_add_become_one_launch(dtype, dynamic):
    torch.manual_seed(0)
    norm = ResidualRMSNorm(64, dtype)
    x, residual = torch.randn(5, 3, 64, dtype=dtype), torch.randn(5, 3, 64, dtype=dtype)
    with torch.no_grad():
        gm, report, (y, total) = rewritten(norm, x, residual, dynamic=dynamic)
        want_y, want_total = norm(x, residual)
    overload = "eps_tensor" if dynamic else "default"
    assert report.rewrites == {f"written-out add + rmsnorm -> bi.add_rms_norm.{overload}": 1}
    ops = targets(gm)
    assert ops[f"bi.add_rms_norm.{overload}"] == 1
    assert not {"aten.add.Tensor", "aten.mean.dim", "aten.pow.Tensor_Scalar", "aten.rsqrt.default"} & set(ops)
    assert torch.equal(total, want_total)  # the sum the next layer reads is aten's add, bit for bit
    # One rounding (eager rounds before the weight too): within an ulp of the input dtype.
    torch.testing.assert_close(y, want_y, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
    alone = rewritten(norm, x[2:3], residual[2:3], dynamic=dynamic)[2]
    assert all(torch.equal(row, whole[2:3]) for row, whole in zip(alone, (y, total)))


def test_written_out_rms_norm_without_add_or_weight():
    def fn(x):
        h = x.float()
        normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)
        return normed, (x * x).float()

    x = torch.randn(4, 32).half()
    gm, report, (y, _) = rewritten(fn, x)
    assert report.rewrites == {"written-out rmsnorm -> bi.rms_norm.default": 1}
    assert gm.graph.find_nodes(op="call_function", target=torch.ops.bi.rms_norm.default)[0].args[1] is None
    torch.testing.assert_close(y, fn(x)[0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nn_rms_norm_after_a_residual_add_becomes_one_launch(dtype):
    """torch.nn.RMSNorm reaches the graph as aten.rms_norm's decomposition (its epsilon an add.Scalar)."""
    torch.manual_seed(0)
    norm = torch.nn.RMSNorm(64, eps=1e-6, dtype=dtype)
    torch.nn.init.normal_(norm.weight)
    x, residual = torch.randn(4, 3, 64, dtype=dtype), torch.randn(4, 3, 64, dtype=dtype)
    with torch.no_grad():
        _, report, out = rewritten(lambda x, r: norm(x + r), x, residual)
        want = norm(x + residual)
    assert report.rewrites == {"written-out add + rmsnorm -> bi.add_rms_norm.default": 1}
    torch.testing.assert_close(out, want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)


def test_written_out_norms_that_differ_stay_for_replace():
    """Chains that are not exactly a norm bi.rms_norm computes keep their ops (their mean becomes bi.mean_square):
    Gemma's 1 + w, an rstd the graph also returns, a norm over another dim. Two take bi.rms_norm for the norm alone
    and leave the rest to Inductor: an fp32 weight on a bf16 input (the product promotes) and vLLM's residual summed
    in fp32 (normalized unrounded: the fp32 sum is the norm's input, not two addends of bi.add_rms_norm)."""
    w16, w32 = torch.randn(64).bfloat16(), torch.randn(64)

    def normed(h, eps=1e-6):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)

    def fn(x, r):
        h = x.float()
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        summed = x.float() + r.float()
        return (normed(h) * (1.0 + w16.float()), (h * rstd).to(x.dtype), rstd,
                h * torch.rsqrt(h.pow(2).mean(0, keepdim=True) + 1e-6),
                w32 * normed(h).to(x.dtype), w16 * normed(summed).to(x.dtype))

    x, r = torch.randn(6, 64).bfloat16(), torch.randn(6, 64).bfloat16()
    gm, report, out = rewritten(fn, x, r)
    assert report.rewrites == {"written-out rmsnorm -> bi.rms_norm.default": 2, "aten.mean.dim -> bi.mean_square": 3}
    norms = gm.graph.find_nodes(op="call_function", target=torch.ops.bi.rms_norm.default)
    assert sorted(str(fake_value(n.args[0]).dtype) for n in norms) == ["torch.bfloat16", "torch.float32"]
    assert all(n.args[1] is None for n in norms) and report.findings == []
    for got, want in zip(out, fn(x, r)):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-5)


def test_repeated_kv_heads_reach_bi_attention_unrepeated():
    """transformers' repeat_kv (expand + reshape of the kv heads, taken when a mask is given) is undone: bi.attention
    reads the [B, Hkv, S, D] tensors with GQA, and the repeated copies leave the graph."""
    model = tiny_qwen3("sdpa")
    ids, attention_mask = torch.randint(0, 97, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    attention_mask[1, 5:] = 0  # a padded row: transformers builds a mask, so it repeats the kv heads itself

    def logits(ids, attention_mask):
        return model(ids, attention_mask=attention_mask, use_cache=False).logits

    gm, report, out = rewritten(logits, ids, attention_mask)
    attentions = [n for n in gm.graph.nodes if n.target is torch.ops.bi.attention.default]
    assert len(attentions) == 2 and report.findings == []
    assert all(fake_value(n.kwargs[kv]).shape[1] == 2 for n in attentions for kv in ("key", "value"))
    assert not any(n.target is torch.ops.aten.expand.default and fake_value(n).dim() == 5 for n in gm.graph.nodes)
    # Per layer: the q and k norms; the input and post-attention norms with the residual add before them (layer 0's
    # input norm reads the embedding: no add); the final norm with the last add.
    assert report.rewrites["written-out rmsnorm -> bi.rms_norm.default"] == 2 * 2 + 1
    assert report.rewrites["written-out add + rmsnorm -> bi.add_rms_norm.default"] == 2 * 2 - 1 + 1
    torch.testing.assert_close(out[0], logits(ids, attention_mask)[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1, :5], logits(ids, attention_mask)[1, :5], rtol=1e-4, atol=1e-4)


def test_qwen3_moe_with_grouped_mm_experts_leaves_nothing_variant():
    """transformers' default MoE experts in bf16: torch._grouped_mm over tokens sorted by expert, with offsets
    from cumsum(histc(...), dtype=int32) (integer arithmetic: exact), becomes bi.grouped_mm."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3MoeConfig(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[])
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(config).eval().bfloat16()
    ids = torch.randint(0, 97, (2, 7))

    def logits(ids):
        return model(ids, use_cache=False).logits

    gm, report, out = rewritten(logits, ids)
    assert report.findings == [] and report.rewrites["aten._grouped_mm.default -> bi.grouped_mm"] == 2  # gate_up, down
    assert "aten._grouped_mm.default" not in targets(gm)
    torch.testing.assert_close(out, logits(ids), rtol=2e-2, atol=2e-2)  # bf16 logits, another summation order


def test_each_pass_logs_its_count_and_can_dump_the_graph_around_it(caplog, monkeypatch, tmp_path):
    """One debug line per pass with its count (rewrites, copies, findings); BI_COMPILE_DEBUG_DIR gets the graph
    before and after each pass."""
    monkeypatch.setenv("BI_COMPILE_DEBUG_DIR", str(tmp_path))
    with caplog.at_level(logging.DEBUG, logger="bi_compile.passes.pipeline"):
        rewritten(lambda x, w: torch.softmax(x @ w, -1), torch.randn(4, 8), torch.randn(8, 8))
    assert [r.getMessage() for r in caplog.records if r.name == "bi_compile.passes.pipeline"] == [
        "bi_compile pass unfuse_add_rms_norm: 0", "bi_compile pass written_rms_norm: 0", "bi_compile pass replace: 2",
        "bi_compile pass contiguous: 0", "bi_compile pass audit: 0"]
    dumps = {path.name.split("-", 1)[1]: path.read_text() for path in tmp_path.iterdir()}
    assert len(dumps) == 10
    assert "aten.mm" in dumps["3-replace-before.txt"] and "bi.mm" not in dumps["3-replace-before.txt"]
    assert "aten.mm" not in dumps["3-replace-after.txt"] and "bi.mm" in dumps["3-replace-after.txt"]


def tiny_layer_norm_model(family: str):
    """A 2-layer transformers model of a LayerNorm family (GPT-2, GPT-NeoX/Pythia, Phi, StarCoder2), seeded random
    weights, fp32."""
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=97, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    config = {
        "gpt2": lambda: transformers.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                bos_token_id=0, eos_token_id=0),
        "gpt-neox": lambda: transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=128, **common),
        "phi": lambda: transformers.PhiConfig(hidden_size=64, intermediate_size=128, **common),
        "starcoder2": lambda: transformers.Starcoder2Config(hidden_size=64, intermediate_size=128, num_key_value_heads=2,
                                                            **common),
    }[family]()
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", ["gpt2", "gpt-neox", "phi", "starcoder2"])
def test_layer_norm_families_leave_nothing_variant(family):
    model = tiny_layer_norm_model(family)
    ids = torch.randint(0, 97, (2, 7))

    def logits(ids):
        return model(ids, use_cache=False).logits

    gm, report, out = rewritten(logits, ids)
    assert report.findings == [] and report.counts["variant"] == report.counts["unknown"] == 0
    assert "aten.native_layer_norm.default" not in targets(gm)
    # Phi: one norm a layer (parallel attention and MLP) and the final one; the rest: two a layer and the final one.
    assert report.rewrites["aten.native_layer_norm.default -> bi.layer_norm"] == (3 if family == "phi" else 5)
    torch.testing.assert_close(out, logits(ids), rtol=1e-4, atol=1e-4)


def test_layer_norm_statistics_are_rewritten_only_where_their_dtypes_match():
    """bi.layer_norm's mean and rstd are fp32; aten keeps a bf16 input's in bf16 on CPU. Such a node becomes
    bi.layer_norm when only its output is read, and stays (audited variant) when its statistics are read too."""

    def fn(x, x16, w):
        y, mean, rstd = torch.ops.aten.native_layer_norm(x, [64], w, w, 1e-5)
        y16 = torch.ops.aten.native_layer_norm(x16, [64], None, None, 1e-5)[0]
        stats16 = torch.ops.aten.native_layer_norm(x16, [64], None, None, 1e-5)[1:]
        return y, mean, rstd, y16, *stats16

    args = (torch.randn(3, 64), torch.randn(3, 64).bfloat16(), torch.randn(64))
    gm, report, out = rewritten(fn, *args)
    assert report.rewrites == {"aten.native_layer_norm.default -> bi.layer_norm": 2}
    assert [(f.kind, f.target) for f in report.findings] == [("variant", "aten.native_layer_norm.default")]
    for got, want in zip(out, fn(*args)):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_the_remaining_reductions_become_bi_ops_and_exact_ones_stay():
    """var/std/var_mean/std_mean over any dims, L2 norms (F.normalize), logsumexp and float cumsum (top-p) become bi
    ops; max-norms, amax and argmax are exact and stay; a float prod has no bi op and is audited variant, an integer
    prod is exact."""

    def fn(x, ids):
        probs = x.softmax(-1).sort(-1, descending=True).values
        return (x.var(-1, keepdim=True), x.std(-1), torch.var_mean(x, [0, 2], unbiased=False), torch.std_mean(x, -1),
                F.normalize(x, dim=-1), torch.linalg.vector_norm(x, float("inf"), -1), torch.logsumexp(x, -1),
                probs.cumsum(-1), x.amax(-1), x.argmax(-1), ids.prod(-1), x.prod(-1))

    x, ids = torch.randn(3, 4, 40), torch.randint(1, 3, (3, 4))
    gm, report, out = rewritten(fn, x, ids)
    assert report.rewrites == {
        "aten.var.correction -> bi.var_mean": 1, "aten.std.correction -> bi.std_mean": 1,
        "aten.var_mean.correction -> bi.var_mean": 1, "aten.std_mean.correction -> bi.std_mean": 1,
        "aten.linalg_vector_norm.default -> bi.l2_norm": 1, "aten.logsumexp.default -> bi.logsumexp": 1,
        "aten._softmax.default -> bi.softmax": 1, "aten.cumsum.default -> bi.cumsum": 1}
    assert [(f.kind, f.target) for f in report.findings] == [("variant", "aten.prod.dim_int")]
    assert targets(gm)["aten.linalg_vector_norm.default"] == 1 and targets(gm)["aten.prod.dim_int"] == 2
    flat = lambda values: [t for v in values for t in (v if isinstance(v, tuple) else (v,))]  # noqa: E731
    for got, want in zip(flat(out), flat(fn(x, ids))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
