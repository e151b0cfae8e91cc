"""bi::paged_attention (the attention of bi-compile's vLLM backend): against float64 over ragged block tables,
chunked prefill and block sizes 16/32; bitwise batch invariance of a request alone vs inside batches of 2-64 at
random places, and across chunkings of its prompt; a control showing the comparison catches a batched stock SDPA;
input errors; the GPU path's gather under Triton's interpreter.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from bi_compile.ops import paged_attention
from bi_compile.ops.library import BIInputError

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@dataclass(frozen=True)
class Request:
    """A request's view of one step: ``seq_len`` positions, the last ``q_len`` of them new this step."""

    q: torch.Tensor  # [q_len, H, D]: the new tokens' queries
    k: torch.Tensor  # [seq_len, Hkv, D]: every key up to the last new token
    v: torch.Tensor  # [seq_len, Hkv, Dv]

    @property
    def seq_len(self) -> int:
        return self.k.shape[0]

    def last(self, q_len: int) -> Request:
        """The same request with only its last ``q_len`` queries new (an earlier chunk already cached)."""
        return Request(self.q[-q_len:], self.k, self.v)


def make_request(rng: random.Random, g: torch.Generator, seq_len: int, q_len: int, heads=4, kv_heads=2, head_dim=64,
                 value_dim=64, dtype=torch.float32) -> Request:
    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    return Request(randn(q_len, heads, head_dim), randn(seq_len, kv_heads, head_dim), randn(seq_len, kv_heads, value_dim))


@dataclass
class Batch:
    query: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    scale: float
    max_query_len: int
    max_seq_len: int

    def args(self):
        return (self.query, self.key_cache, self.value_cache, self.block_table, self.seq_lens, self.query_start_loc,
                self.scale, self.max_query_len, self.max_seq_len)


def pack(requests: list[Request], block_size: int, seed: int, padding_tokens: int = 0) -> Batch:
    """vLLM's layout: queries back to back (plus ``padding_tokens`` of junk), keys and values in randomly chosen
    blocks of a cache as vLLM's model runner sees it ([blocks, Hkv, block_size, D + Dv], split into two views), the
    unused slots and blocks full of junk (NaN included), block tables wider than needed."""
    rng = random.Random(seed)
    first = requests[0]
    heads, head_dim = first.q.shape[1:]
    kv_heads, value_dim = first.v.shape[1:]
    per_request = [-(-r.seq_len // block_size) for r in requests]
    num_blocks = sum(per_request) + 5
    cache = torch.randn(num_blocks, kv_heads, block_size, head_dim + value_dim).to(first.q.dtype)
    cache[rng.randrange(num_blocks), 0, 0, 0] = math.nan
    key_cache, value_cache = cache.split([head_dim, value_dim], dim=-1)
    order = list(range(num_blocks))
    rng.shuffle(order)
    width = max(per_request) + 2
    block_table = torch.tensor([rng.randrange(num_blocks) for _ in range(len(requests) * width)],
                               dtype=torch.int32).view(len(requests), width)
    for r, (request, count) in enumerate(zip(requests, per_request)):
        block_table[r, :count] = torch.tensor(order[:count])
        order = order[count:]
        for j in range(request.seq_len):
            block, slot = block_table[r, j // block_size], j % block_size
            key_cache[block, :, slot], value_cache[block, :, slot] = request.k[j], request.v[j]
    query = torch.cat([r.q for r in requests] + [torch.randn(padding_tokens, heads, head_dim).to(first.q.dtype)])
    q_lens = [r.q.shape[0] for r in requests]
    starts = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    return Batch(query, key_cache, value_cache, block_table, torch.tensor([r.seq_len for r in requests],
                                                                        dtype=torch.int32),
                 starts, 1 / math.sqrt(head_dim), max(q_lens), max(r.seq_len for r in requests))


def reference(request: Request, scale: float) -> torch.Tensor:
    """float64 causal attention of the request's new queries (at positions seq_len - q_len ...) -> [q_len, H, Dv]."""
    q, k, v = (t.double().transpose(0, 1) for t in (request.q, request.k, request.v))
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    q_len, seq_len = q.shape[1], k.shape[1]
    visible = torch.arange(seq_len)[None, :] <= torch.arange(seq_len - q_len, seq_len)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale).transpose(0, 1)


def rows(out: torch.Tensor, batch: Batch, r: int) -> torch.Tensor:
    return out[batch.query_start_loc[r]:batch.query_start_loc[r + 1]]


Attention = Callable[[Batch], torch.Tensor]


def bi_paged(batch: Batch) -> torch.Tensor:
    return torch.ops.bi.paged_attention(*batch.args())


# ---- accuracy ----

# (seq_len, q_len) per request: decodes, chunks of a prefill into a cache, whole prompts; a chunk starting
# mid-tile and mid-block; one key; lengths across several 64-key chunks.
RAGGED = [(1, 1), (37, 1), (200, 1), (70, 13), (129, 64), (33, 33), (5, 5), (150, 8), (64, 1), (96, 31)]


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads, kv_heads, head_dim, value_dim", [(4, 2, 64, 64), (6, 1, 40, 24), (2, 2, 128, 128)])
def test_matches_float64_reference(block_size, dtype, heads, kv_heads, head_dim, value_dim):
    rng, g = random.Random(1), torch.Generator().manual_seed(1)
    requests = [make_request(rng, g, n, l, heads, kv_heads, head_dim, value_dim, dtype) for n, l in RAGGED]
    batch = pack(requests, block_size, seed=2, padding_tokens=3)
    out = bi_paged(batch)
    assert out.shape == (batch.query.shape[0], heads, value_dim) and out.dtype == dtype
    for r, request in enumerate(requests):
        ref = reference(request, batch.scale)
        torch.testing.assert_close(rows(out, batch, r).double(), ref, rtol=0,
                                   atol=TOLERANCE[dtype] * max(ref.abs().max().item(), 1.0))
    assert torch.equal(out[-3:], torch.zeros_like(out[-3:]))  # padding tokens


# ---- batch invariance ----


def variant_requests(attention: Attention, dtype, block_size: int, batch_sizes, seed=0) -> int:
    """How many (batch, request) draws give a request other bits than it has alone; each batch is random requests
    (decodes, prefill chunks, whole prompts) in random order, packed into random blocks."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    pool = []
    for _ in range(max(batch_sizes) + 8):
        n = rng.randint(1, 300)
        kind = rng.choice(("decode", "chunk", "prompt"))
        pool.append(make_request(rng, g, n, {"decode": 1, "chunk": rng.randint(1, min(n, 40)), "prompt": n}[kind],
                                 dtype=dtype))
    alone: dict[int, torch.Tensor] = {}
    differ = 0
    for size in batch_sizes:
        members = rng.sample(range(len(pool)), size)
        batch = pack([pool[i] for i in members], block_size, seed=size)
        out = attention(batch)
        for r, i in enumerate(members):
            if i not in alone:
                alone[i] = attention(pack([pool[i]], block_size, seed=i))
            differ += not torch.equal(rows(out, batch, r), alone[i])
    return differ


@pytest.mark.parametrize("dtype, block_size", [(torch.bfloat16, 16), (torch.float32, 32)])
def test_requests_are_batch_invariant(dtype, block_size):
    """Batches of 2 to 64: every request has, bit for bit, the rows it has alone."""
    assert variant_requests(bi_paged, dtype, block_size, batch_sizes=(2, 3, 7, 16, 33, 64)) == 0


def test_rows_do_not_depend_on_how_the_prompt_was_chunked():
    """A prompt of 150 tokens in one step, then in chunks of 1, 7, 40 and 64 (the earlier chunks cached): each
    position's row has the same bits, and a decode at position 149 equals the prompt's last row."""
    rng, g = random.Random(3), torch.Generator().manual_seed(3)
    prompt = make_request(rng, g, 150, 150, dtype=torch.bfloat16)
    whole = bi_paged(pack([prompt], 16, seed=0))
    for chunk in (1, 7, 40, 64):
        for end in range(chunk, 151, chunk):
            step = Request(prompt.q[end - chunk:end], prompt.k[:end], prompt.v[:end])
            assert torch.equal(bi_paged(pack([step], 16, seed=end)), whole[end - chunk:end]), (chunk, end)


def test_invariant_to_the_thread_count():
    rng, g = random.Random(4), torch.Generator().manual_seed(4)
    requests = [make_request(rng, g, n, l) for n, l in RAGGED]
    batch = pack(requests, 16, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = bi_paged(batch)
        torch.set_num_threads(max(2, threads))
        assert torch.equal(one, bi_paged(batch))
    finally:
        torch.set_num_threads(threads)


def stock_batched(batch: Batch) -> torch.Tensor:
    """Control: the same gather into a padded batch, then stock SDPA on the whole batch at once."""
    def attend(q, k, v, mask, scale):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)

    return paged_attention._paged_attention_dense(*batch.args(), attend)


def test_control_stock_batched_sdpa_is_not_batch_invariant():
    """The comparison above catches a naive batched implementation (stock CPU SDPA over the padded batch), so its
    zero means something."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        assert variant_requests(stock_batched, torch.float32, 16, batch_sizes=(2, 7, 33)) > 0
    finally:
        torch.set_num_threads(threads)


# ---- input errors ----


def _error_cases():
    rng, g = random.Random(0), torch.Generator().manual_seed(0)
    b = pack([make_request(rng, g, 20, 3)], 16, seed=0)
    op = torch.ops.bi.paged_attention

    def call(**changes):
        args = dict(query=b.query, key_cache=b.key_cache, value_cache=b.value_cache, block_table=b.block_table,
                    seq_lens=b.seq_lens, query_start_loc=b.query_start_loc)
        args.update(changes)
        return lambda: op(*args.values(), b.scale, b.max_query_len, b.max_seq_len)

    cases = [
        (call(query=b.query.double()), "float64"),
        (call(query=b.query.half()), "one dtype"),
        (call(block_table=b.block_table.float()), "float32"),
        (call(query=b.query[0]), "rank 2"),
        (call(query=b.query[..., :32]), "head dims differ"),
        (call(value_cache=b.value_cache[:, :, :8]), "must agree in blocks"),
        (call(query=torch.randn(3, 3, 64)), "must divide"),
        (call(seq_lens=b.seq_lens.repeat(2)), "same requests"),
        (call(query=torch.randn(3, 64, 4).transpose(1, 2)), "layout contract"),
    ]
    return [pytest.param(fn, text, id=str(i)) for i, (fn, text) in enumerate(cases)]


@pytest.mark.parametrize("call, text", _error_cases())
def test_bad_input_raises_naming_op_and_tensor(call, text):
    with pytest.raises(BIInputError) as info:
        call()
    assert str(info.value).startswith("bi::paged_attention:") and text in str(info.value)


def test_schema_and_fake_impl():
    rng, g = random.Random(0), torch.Generator().manual_seed(0)
    b = pack([make_request(rng, g, 20, 3), make_request(rng, g, 9, 1)], 16, seed=0)
    torch.library.opcheck(torch.ops.bi.paged_attention.default, b.args(), test_utils=("test_schema", "test_faketensor"))


# ---- the GPU path (gather + the Triton kernel) under Triton's interpreter ----

interpreter_only = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton kernel on CPU tensors under TRITON_INTERPRET=1"
)


def triton_paged(batch: Batch) -> torch.Tensor:
    """The GPU path on CPU tensors: the op would route them to the CPU path, so the gather is called directly with
    the Triton launcher."""
    from bi_compile.kernels import attention as kernels

    def attend(q, k, v, mask, scale):
        return kernels.attention(q, k, v, mask.expand(q.shape[0], q.shape[1], -1, -1), False, scale)

    return paged_attention._paged_attention_dense(*batch.args(), attend)


@interpreter_only
def test_interpreted_gpu_path_matches_reference_and_is_batch_invariant():
    rng, g = random.Random(6), torch.Generator().manual_seed(6)
    requests = [make_request(rng, g, n, l, dtype=torch.float16) for n, l in [(1, 1), (37, 1), (70, 13), (20, 20)]]
    batch = pack(requests, 16, seed=7, padding_tokens=2)
    out = triton_paged(batch)
    for r, request in enumerate(requests):
        ref = reference(request, batch.scale)
        torch.testing.assert_close(rows(out, batch, r).double(), ref, rtol=0, atol=2e-3 * max(ref.abs().max().item(), 1))
        assert torch.equal(rows(out, batch, r), triton_paged(pack([request], 32, seed=r)))
    assert torch.equal(out[-2:], torch.zeros_like(out[-2:]))
