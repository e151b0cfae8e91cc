"""The Ascend aclgraph route on CPU: a decode step written with torch_npu's fused norms, compiled by ``bi_ascend``
with ``inner="eager"`` (the route vllm-ascend's FULL_DECODE_ONLY mode takes: no code generation, the rewritten ATen
graph captured as it runs), captured and replayed through a stand-in for the aclgraph API (tests/aclgraph_standin.py).

The torch_npu ops are stand-ins under their real names and schemas (tests/foreign_ops.py). What this shows: the
pipeline rewrites the npu norms, the compiled step holds no host decision taken from data (a replay with new inputs
gives the bits of running the compiled step directly on them), and one symbolic compile captured at several batch
sizes gives a request's row the same bits at each. What it cannot show: NPU kernels, streams, or what torch_npu's
real capture accepts (docs/ascend.md, "What has been checked").
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bi_compile.passes import reports
from tests.aclgraph_standin import NPUGraph, graph_capture
from tests.foreign_ops import register

register()

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB, CACHE = 64, 4, 2, 16, 96, 101, 24


class DecodeStep(torch.nn.Module):
    """One Qwen3-style layer and the LM head, a token per row, a static KV cache written at each row's position."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def weight(*shape):
            return torch.nn.Parameter(torch.randn(*shape, generator=g) / shape[-1] ** 0.5, requires_grad=False)

        self.embed = weight(VOCAB, HIDDEN)
        self.ln1, self.ln2, self.ln_f = (torch.nn.Parameter(1 + 0.1 * torch.randn(HIDDEN, generator=g),
                                                            requires_grad=False) for _ in range(3))
        self.q_norm = torch.nn.Parameter(torch.ones(HEAD_DIM), requires_grad=False)
        self.wqkv = weight((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN)
        self.wo = weight(HIDDEN, HEADS * HEAD_DIM)
        self.wgate, self.wup = weight(INTER, HIDDEN), weight(INTER, HIDDEN)
        self.wdown = weight(HIDDEN, INTER)

    def forward(self, tokens, pos, k_cache, v_cache):
        # tokens, pos: [B]; k_cache, v_cache: [B, KV_HEADS, CACHE, HEAD_DIM]
        batch = tokens.shape[0]
        x = self.embed[tokens]
        h, _ = torch.ops.npu.npu_rms_norm(x, self.ln1, 1e-6)
        q, k, v = F.linear(h, self.wqkv).split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1)
        q, _ = torch.ops.npu.npu_rms_norm(q.view(batch, HEADS, 1, HEAD_DIM), self.q_norm, 1e-6)
        slot = pos.view(batch, 1, 1, 1).expand(batch, KV_HEADS, 1, HEAD_DIM)
        k_cache.scatter_(2, slot, k.view(batch, KV_HEADS, 1, HEAD_DIM))
        v_cache.scatter_(2, slot, v.view(batch, KV_HEADS, 1, HEAD_DIM))
        visible = (torch.arange(CACHE, device=pos.device) <= pos[:, None]).view(batch, 1, 1, CACHE)
        attn = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=visible, enable_gqa=True)
        o = F.linear(attn.reshape(batch, HEADS * HEAD_DIM), self.wo)
        h, _, residual = torch.ops.npu.npu_add_rms_norm(o, x, self.ln2, 1e-6)
        mlp = F.linear(F.silu(F.linear(h, self.wgate)) * F.linear(h, self.wup), self.wdown)
        h, _, _ = torch.ops.npu.npu_add_rms_norm(mlp, residual, self.ln_f, 1e-6)
        return torch.log_softmax(F.linear(h, self.embed).float(), -1)


def _inputs(batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, VOCAB, (batch,), generator=g), torch.randint(0, CACHE, (batch,), generator=g),
            torch.randn(batch, KV_HEADS, CACHE, HEAD_DIM, generator=g), torch.randn(batch, KV_HEADS, CACHE, HEAD_DIM, generator=g))


def _fill(static, new) -> None:
    for buffer, value in zip(static, new):
        buffer.copy_(value)


def _capture(compiled, static) -> tuple[NPUGraph, torch.Tensor]:
    """Warm up, then capture: as with a real graph, the capture must meet a compiled frame (Dynamo does not trace
    under the recorder), and the warm-up's cache write is undone by the replays' writes to the same slots."""
    _after_step(compiled, static)
    graph = NPUGraph()
    with graph_capture(graph):
        out = compiled(*static)
    return graph, out


@pytest.fixture(scope="module")
def compiled_step():
    torch._dynamo.reset()
    step = DecodeStep()
    graphs_before = len(reports())
    compiled = torch.compile(step, backend="bi_ascend", dynamic=True, fullgraph=True,
                             options={"inner": "eager", "strict": True})
    compiled(*_inputs(3, 0))  # compile once, for a symbolic batch
    return step, compiled, reports()[graphs_before:]


def test_the_npu_norms_are_rewritten_and_nothing_variant_is_left(compiled_step):
    _, _, graph_reports = compiled_step
    rewrites = {row: count for report in graph_reports for row, count in report.rewrites.items()}
    assert rewrites["npu.npu_add_rms_norm.default -> bi.add_rms_norm"] == 2
    assert rewrites["npu.npu_rms_norm.default -> bi.rms_norm"] == 2
    assert all(not report.findings for report in graph_reports)  # strict=True would have raised


@pytest.mark.parametrize("batch", [1, 4])
def test_a_replayed_capture_gives_the_compiled_steps_bits_on_new_inputs(compiled_step, batch):
    step, compiled, _ = compiled_step
    static = _inputs(batch, 1)
    graph, out = _capture(compiled, static)
    assert {"bi.linear.default", "bi.rms_norm.default", "bi.attention.default"} <= {str(op) for op, *_ in graph.ops}
    new = _inputs(batch, 2)
    _fill(static, new)
    graph.replay()
    direct = compiled(*_inputs(batch, 2))
    assert torch.equal(out, direct)
    assert torch.equal(static[2], _after_step(compiled, new)[2])  # the cache write replays too
    torch.testing.assert_close(out, step(*_inputs(batch, 2)), rtol=1e-4, atol=1e-4)  # the uncompiled npu ops


def _after_step(fn, inputs):
    inputs = tuple(t.clone() for t in inputs)
    fn(*inputs)
    return inputs


def test_captures_at_two_batch_sizes_give_a_row_the_same_bits(compiled_step):
    """FULL_DECODE_ONLY's capture sizes: the request in row 0 of a 1-row graph and of a 4-row graph."""
    _, compiled, _ = compiled_step
    request = _inputs(1, 3)
    others = _inputs(3, 4)
    outs = []
    for batch in (1, 4):
        static = _inputs(batch, 5)
        graph, out = _capture(compiled, static)
        _fill(static, [torch.cat([r, o])[:batch] for r, o in zip(request, others)])
        graph.replay()
        outs.append(out[:1].clone())
    assert torch.equal(outs[0], outs[1])


def test_control_a_stale_host_decision_shows_in_the_replay():
    """Control: a step that reads a tensor's value on the host replays the value it saw at capture, so the
    comparison above can fail."""
    def host_decision(x):
        return x * float(x.sum())

    static = torch.ones(3)
    graph = NPUGraph()
    with graph_capture(graph):
        out = host_decision(static)
    static.copy_(torch.full((3,), 2.0))
    graph.replay()
    assert not torch.equal(out, host_decision(static))
