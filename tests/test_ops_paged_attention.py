"""bi::paged_attention (the attention of bi-compile's vLLM backend): against float64 over ragged block tables,
chunked prefill and block sizes 16/32; bitwise batch invariance of a request alone vs inside batches of 2-64 at
random places, and across chunkings of its prompt; a control showing the comparison catches a batched stock SDPA;
input errors.

The Triton kernel (the CUDA path) under Triton's interpreter (fp32, fp16): the same checks in both schedules, plus
larger bounds keeping the bits, recycled cache slots full of NaN, the tile-slot bound, and a control (a split size
from the bound) that the invariance checks catch. On a GPU (``-m gpu``): the same in bf16 at model sizes, and the
op captured in a CUDA graph with static bounds, replayed with other lengths, block tables and queries.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, replace

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

    def to(self, device: str) -> Batch:
        """The same batch on ``device`` (the caches stay views of one [.., D + Dv] tensor)."""
        cache = self.key_cache.untyped_storage()
        whole = torch.empty(0, dtype=self.key_cache.dtype).set_(cache).to(device)
        key_cache, value_cache = (whole.as_strided(t.shape, t.stride(), t.storage_offset())
                                  for t in (self.key_cache, self.value_cache))
        return replace(self, query=self.query.to(device), key_cache=key_cache, value_cache=value_cache,
                       block_table=self.block_table.to(device), seq_lens=self.seq_lens.to(device),
                       query_start_loc=self.query_start_loc.to(device))

    def with_bounds(self, max_query_len: int, max_seq_len: int) -> Batch:
        return replace(self, max_query_len=max_query_len, max_seq_len=max_seq_len)


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


def variant_requests(attention: Attention, dtype, block_size: int, batch_sizes, seed=0, max_len=300, max_chunk=40,
                     max_prompt=None, shape=(4, 2, 64, 64), device="cpu") -> int:
    """How many (batch, request) draws give a request other bits than it has alone; each batch is random requests
    (decodes, prefill chunks, whole prompts; up to ``max_len`` positions, chunks up to ``max_chunk``, prompts up to
    ``max_prompt``) in random order, packed into random blocks. ``shape``: (heads, kv_heads, head_dim, value_dim)."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    pool = []
    for _ in range(max(batch_sizes) + 8):
        kind = rng.choice(("decode", "chunk", "prompt"))
        n = rng.randint(1, max_len if kind != "prompt" or max_prompt is None else max_prompt)
        q_len = {"decode": 1, "chunk": rng.randint(1, min(n, max_chunk)), "prompt": n}[kind]
        pool.append(make_request(rng, g, n, q_len, *shape, dtype=dtype))
    alone: dict[int, torch.Tensor] = {}
    differ = 0
    for size in batch_sizes:
        members = rng.sample(range(len(pool)), size)
        batch = pack([pool[i] for i in members], block_size, seed=size).to(device)
        out = attention(batch)
        for r, i in enumerate(members):
            if i not in alone:
                alone[i] = attention(pack([pool[i]], block_size, seed=i).to(device))
            differ += not torch.equal(rows(out, batch, r), alone[i])
    return differ


@pytest.mark.parametrize("dtype, block_size", [(torch.bfloat16, 16), (torch.float32, 32)])
def test_requests_are_batch_invariant(dtype, block_size):
    """Batches of 2 to 64: every request has, bit for bit, the rows it has alone."""
    assert variant_requests(bi_paged, dtype, block_size, batch_sizes=(2, 3, 7, 16, 33, 64)) == 0


def chunked_prompt_rows_differ(attention: Attention, prompt: Request, chunks, block_size=16,
                               device="cpu") -> list[tuple[int, int]]:
    """(chunk, end) of every step whose rows differ from the whole prompt's rows (the earlier chunks cached), a
    decode of the last position included (chunk 1)."""
    whole = attention(pack([prompt], block_size, seed=0).to(device))
    differ = []
    for chunk in chunks:
        for end in range(chunk, prompt.seq_len + 1, chunk):
            step = Request(prompt.q[end - chunk:end], prompt.k[:end], prompt.v[:end])
            if not torch.equal(attention(pack([step], block_size, seed=end).to(device)), whole[end - chunk:end]):
                differ.append((chunk, end))
    return differ


def test_rows_do_not_depend_on_how_the_prompt_was_chunked():
    """A prompt of 150 tokens in one step, then in chunks of 1, 7, 40 and 64 (the earlier chunks cached): each
    position's row has the same bits, and a decode at position 149 equals the prompt's last row."""
    rng, g = random.Random(3), torch.Generator().manual_seed(3)
    prompt = make_request(rng, g, 150, 150, dtype=torch.bfloat16)
    assert chunked_prompt_rows_differ(bi_paged, prompt, (1, 7, 40, 64)) == []


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




# ---- the Triton kernel (CUDA) under Triton's interpreter: CPU tensors, fp32 and fp16 ----

interpreter_only = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton kernel on CPU tensors under TRITON_INTERPRET=1"
)


def triton_paged(batch: Batch) -> torch.Tensor:
    """The op's Triton entry (checks, plan, launch) called directly: the op routes CPU tensors to the CPU path."""
    pytest.importorskip("triton")
    return paged_attention._paged_attention_triton(*batch.args())


def triton_schedule(split_kv: bool) -> Attention:
    """The kernel in one schedule: a program per split and a merge kernel, or the splits merged in one program."""
    from bi_compile.kernels import paged_attention as kernels

    return lambda batch: kernels.paged_attention(*batch.args(), split_kv=split_kv)


def splits_from_the_bound(batch: Batch) -> torch.Tensor:
    """Control: the same kernel with its split size derived from ``max_seq_len`` (four splits whatever the length,
    the way a split-KV kernel sizes its work for the step), so a row's reduction tree follows the batch."""
    from bi_compile.kernels import paged_attention as kernels

    plan = kernels.plan_paged_attention(batch.query, batch.key_cache, batch.value_cache, batch.block_table)
    block_n = plan.meta["BLOCK_N"]
    split_n = -(-batch.max_seq_len // (4 * block_n)) * block_n
    plan = replace(plan, split_n=split_n, meta=dict(plan.meta, SPLIT_N=split_n),
                   merge_meta=dict(plan.merge_meta, SPLIT_N=split_n))
    return kernels.launch_paged_attention(plan, *batch.args(), split_kv=False)


# (seq_len, q_len): decodes, chunks starting mid-tile and mid-block, a whole prompt, two 512-key splits.
INTERPRETED_RAGGED = [(1, 1), (37, 1), (70, 13), (33, 33), (96, 31), (600, 1), (530, 20)]


@interpreter_only
@pytest.mark.parametrize("dtype, block_size, heads, kv_heads, head_dim, value_dim", [
    (torch.float32, 16, 4, 4, 64, 64), (torch.float16, 32, 4, 2, 64, 40), (torch.float32, 16, 8, 2, 64, 24),
    (torch.float16, 32, 6, 1, 40, 64)],
    ids=["G1-bs16-fp32", "G2-bs32-dv40-fp16", "G4-bs16-dv24-fp32", "G6-bs32-d40-fp16"])
def test_interpreted_kernel_matches_float64_reference_in_both_schedules(dtype, block_size, heads, kv_heads, head_dim,
                                                                      value_dim):
    """Ragged block tables (random, non-contiguous block ids, wider than needed), decodes and prefill chunks, GQA
    1/2/4/6: within tolerance of float64, both schedules the same bits, padding rows (NaN queries) exactly 0."""
    rng, g = random.Random(11), torch.Generator().manual_seed(11)
    requests = [make_request(rng, g, n, l, heads, kv_heads, head_dim, value_dim, dtype) for n, l in INTERPRETED_RAGGED]
    batch = pack(requests, block_size, seed=12, padding_tokens=3)
    batch.query[-3:] = math.nan
    merged, split = (triton_schedule(s)(batch) for s in (False, True))
    assert merged.shape == (batch.query.shape[0], heads, value_dim) and merged.dtype == dtype
    assert torch.equal(merged, split)
    for r, request in enumerate(requests):
        ref = reference(request, batch.scale)
        torch.testing.assert_close(rows(merged, batch, r).double(), ref, rtol=0,
                                   atol=TOLERANCE[dtype] * max(ref.abs().max().item(), 1.0))
    assert torch.equal(merged[-3:], torch.zeros_like(merged[-3:]))


@interpreter_only
@pytest.mark.parametrize("dtype, block_size", [(torch.float16, 16), (torch.float32, 32)], ids=["fp16", "fp32"])
def test_interpreted_kernel_requests_are_batch_invariant(dtype, block_size):
    """Batches of 2 to 16 at random places (the op's own schedule choice: the small ones split, the large ones
    merged), decodes and chunks up to 600 positions (two splits), prompts up to 64: every request has the bits it
    has alone."""
    assert variant_requests(triton_paged, dtype, block_size, batch_sizes=(2, 5, 16), max_len=600, max_chunk=16,
                            max_prompt=64) == 0


@interpreter_only
def test_interpreted_kernel_rows_do_not_depend_on_how_the_prompt_was_chunked():
    """A 70-token prompt whole, in chunks of 1 (decodes), 9 and 40; and a 540-token prompt (two splits) whole and
    in two chunks of 270 (the merged schedule; the reference test has both give the same bits)."""
    rng, g = random.Random(13), torch.Generator().manual_seed(13)
    short = make_request(rng, g, 70, 70, dtype=torch.float16)
    assert chunked_prompt_rows_differ(triton_paged, short, (1, 9, 40)) == []
    long = make_request(rng, g, 540, 540, dtype=torch.float16)
    assert chunked_prompt_rows_differ(triton_paged, long, (270,), block_size=32) == []


@interpreter_only
@pytest.mark.parametrize("split_kv", [False, True], ids=["merged", "split"])
def test_interpreted_kernel_larger_bounds_keep_the_bits(split_kv):
    """max_query_len and max_seq_len are bounds (a CUDA graph passes static ones): more tile slots and splits than
    the step needs change no bit."""
    rng, g = random.Random(14), torch.Generator().manual_seed(14)
    batch = pack([make_request(rng, g, n, l, dtype=torch.float16) for n, l in INTERPRETED_RAGGED], 16, seed=15,
                 padding_tokens=2)
    attend = triton_schedule(split_kv)
    tight = attend(batch)
    for max_query_len, max_seq_len in [(batch.max_query_len + 1, batch.max_seq_len), (64, 1100), (1000, 2048)]:
        assert torch.equal(attend(batch.with_bounds(max_query_len, max_seq_len)), tight)


@interpreter_only
def test_interpreted_kernel_ignores_recycled_cache_slots():
    """NaN in every cache slot a request does not own (past its length in its last block, the blocks its table
    lists past them) and in the keys after a row's position: no NaN reaches an output row."""
    rng, g = random.Random(16), torch.Generator().manual_seed(16)
    requests = [make_request(rng, g, n, l, dtype=torch.float16) for n, l in [(37, 1), (70, 13), (20, 20)]]
    batch = pack(requests, 16, seed=17)
    clean = triton_paged(batch)
    owned = torch.zeros(batch.key_cache.shape[:3], dtype=torch.bool)
    for r, request in enumerate(requests):
        for j in range(request.seq_len):
            owned[batch.block_table[r, j // 16], :, j % 16] = True
    batch.key_cache[~owned] = math.nan
    batch.value_cache[~owned] = math.nan
    poisoned = triton_paged(batch)
    assert not poisoned.isnan().any() and torch.equal(poisoned, clean)


@interpreter_only
@pytest.mark.parametrize("split_kv", [False, True], ids=["merged", "split"])
def test_interpreted_kernel_zeroes_every_padding_row_of_fresh_memory(split_kv, monkeypatch):
    """A CUDA graph pads a step's tokens: 2 decodes and 70 padding tokens (more than the few programs of the grid
    zero in one pass) get their rows, and the padding rows are 0 even where the output's fresh memory held NaN."""
    rng, g = random.Random(20), torch.Generator().manual_seed(20)
    batch = pack([make_request(rng, g, n, 1, dtype=torch.float16) for n in (37, 600)], 16, seed=21,
                 padding_tokens=70)
    expected = [triton_paged(replace(batch, query=batch.query[:2]))[r] for r in range(2)]
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: empty(*args, **kwargs).fill_(math.nan))
    out = triton_schedule(split_kv)(batch)
    assert torch.equal(out[:2], torch.stack(expected))
    assert torch.equal(out[2:], torch.zeros_like(out[2:]))


@interpreter_only
def test_interpreted_control_a_split_count_from_the_bound_varies():
    """The comparisons above can fail: the kernel with its split size derived from max_seq_len gives a request
    other bits inside a batch than alone, and other bits for a larger bound."""
    assert variant_requests(splits_from_the_bound, torch.float32, 16, batch_sizes=(4,), max_len=600, max_chunk=4,
                            max_prompt=16) > 0
    rng, g = random.Random(18), torch.Generator().manual_seed(18)
    batch = pack([make_request(rng, g, 600, 4, dtype=torch.float32)], 16, seed=19)
    assert not torch.equal(splits_from_the_bound(batch), splits_from_the_bound(batch.with_bounds(4, 4096)))


def test_tile_slots_bound_every_request_mix():
    """``max_tiles`` (host ints only) is never below the tiles a batch of those T, R and max_query_len needs."""
    from bi_compile.kernels.paged_attention import max_tiles

    rng = random.Random(20)
    for _ in range(2000):
        positions = rng.choice((1, 2, 4, 8, 16, 64))
        q_lens = [rng.choice((0, 1, rng.randint(1, 200))) for _ in range(rng.randint(1, 9))]
        contexts = [rng.randint(0, 300) for _ in q_lens]
        tiles = sum((c + q - 1) // positions - c // positions + 1 for c, q in zip(contexts, q_lens) if q)
        tokens = sum(q_lens) + rng.randint(0, 5)
        assert tiles <= max_tiles(tokens, len(q_lens), max(q_lens), positions)


# ---- bi::write_kv_cache: the step's keys and values into their slots ----


def kv_write_case(dtype: torch.dtype, seed: int, device: str = "cpu"):
    """vLLM's shapes: key and value are views of one fused qkv row ([T, (H + 2 Hkv) D] strides), the caches two
    views of one [blocks, Hkv, block_size, D + Dv] tensor full of NaN; 9 slots for 11 tokens (the last two are
    past the slot mapping: not written), two of them -1 (padding)."""
    g = torch.Generator().manual_seed(seed)
    blocks, heads, kv_heads, block_size, dim = 6, 4, 2, 16, 40
    qkv = torch.randn(11, (heads + 2 * kv_heads) * dim, generator=g).to(dtype).to(device)
    key = qkv[:, heads * dim:(heads + kv_heads) * dim].view(11, kv_heads, dim)
    value = qkv[:, (heads + kv_heads) * dim:].view(11, kv_heads, dim)
    cache = torch.full((blocks, kv_heads, block_size, 2 * dim), math.nan, dtype=dtype, device=device)
    key_cache, value_cache = cache.split([dim, dim], -1)
    slots = torch.randperm(blocks * block_size, generator=g)[:9].to(device)
    slots[[2, 7]] = -1
    return key, value, key_cache, value_cache, slots


def expected_cache(key, value, key_cache, value_cache, slots) -> tuple[torch.Tensor, torch.Tensor]:
    keys, values = key_cache.clone(), value_cache.clone()
    block_size = key_cache.shape[2]
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            keys[slot // block_size, :, slot % block_size] = key[t]
            values[slot // block_size, :, slot % block_size] = value[t]
    return keys, values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_cache_fills_the_slots_and_skips_padding(dtype):
    case = kv_write_case(dtype, seed=1)
    keys, values = expected_cache(*case)
    torch.ops.bi.write_kv_cache(*case)
    key_cache, value_cache = case[2:4]
    assert torch.equal(key_cache.nan_to_num(7.0), keys.nan_to_num(7.0))
    assert torch.equal(value_cache.nan_to_num(7.0), values.nan_to_num(7.0))
    assert int((~key_cache.isnan()).all(-1).sum()) == 7 * 2  # 7 real tokens x 2 kv heads, nothing else


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interpreted_write_kv_cache_kernel_matches_the_cpu_path(dtype):
    cpu, kernel = kv_write_case(dtype, seed=2), kv_write_case(dtype, seed=2)
    torch.ops.bi.write_kv_cache(*cpu)
    paged_attention._write_kv_cache_triton(*kernel)
    for a, b in zip(cpu[2:4], kernel[2:4]):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


def test_write_kv_cache_bad_input_raises_naming_op_and_tensor():
    key, value, key_cache, value_cache, slots = kv_write_case(torch.float32, seed=3)
    op = torch.ops.bi.write_kv_cache
    cases = [
        (lambda: op(key.half(), value, key_cache, value_cache, slots), "one dtype"),
        (lambda: op(key, value, key_cache, value_cache, slots.float()), "slot_mapping"),
        (lambda: op(key[:, :1], value, key_cache, value_cache, slots), "must match key_cache"),
        (lambda: op(key, value, key_cache, value_cache[:, :, :8], slots), "must match key_cache"),
        (lambda: op(key[0], value, key_cache, value_cache, slots), "rank"),
    ]
    for call, text in cases:
        with pytest.raises(BIInputError, match=text) as info:
            call()
        assert str(info.value).startswith("bi::write_kv_cache:")
    with pytest.raises(BIInputError, match="bi::write_kv_cache: .*layout"):
        op(key.transpose(0, 2).contiguous().transpose(0, 2), value, key_cache, value_cache, slots)


def test_write_kv_cache_schema_and_fake_impl():
    torch.library.opcheck(torch.ops.bi.write_kv_cache.default, kv_write_case(torch.float32, seed=4),
                          test_utils=("test_schema", "test_faketensor"))


# ---- GPU: bf16 at model sizes, CUDA graphs ----

GPU_SHAPES = [(32, 8, 128, 128), (16, 8, 128, 128), (8, 1, 64, 64), (4, 1, 256, 256)]


def cuda_paged(batch: Batch) -> torch.Tensor:
    return torch.ops.bi.paged_attention(*batch.args())


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "H{}kv{}d{}".format(*s))
def test_gpu_requests_are_batch_invariant_bf16(shape):
    """Batches of 2 to 64 (decodes and chunks up to 5000 positions, prompts up to 1024; small batches split the
    keys, large ones merge in one program): every request has the bits it has alone."""
    assert variant_requests(cuda_paged, torch.bfloat16, 16, batch_sizes=(2, 7, 33, 64), max_len=5000, max_chunk=300,
                            max_prompt=1024, shape=shape, device="cuda") == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_matches_reference_and_schedules_and_bounds_agree(dtype):
    """Llama-8B-like heads over block sizes 16/32/64: within tolerance of float64; the split and merged schedules
    and larger bounds give the same bits; padding rows are 0."""
    from bi_compile.kernels import paged_attention as kernels

    rng, g = random.Random(21), torch.Generator().manual_seed(21)
    lengths = [(1, 1), (700, 1), (5000, 1), (1500, 300), (600, 600), (2049, 17)]
    requests = [make_request(rng, g, n, l, 32, 8, 128, 128, dtype) for n, l in lengths]
    for block_size in (16, 32, 64):
        batch = pack(requests, block_size, seed=block_size, padding_tokens=5).to("cuda")
        out = cuda_paged(batch)
        for r, request in enumerate(requests):
            ref = reference(request, batch.scale)
            torch.testing.assert_close(rows(out, batch, r).double().cpu(), ref, rtol=0,
                                       atol=TOLERANCE[dtype] * max(ref.abs().max().item(), 1.0))
        assert torch.equal(out[-5:], torch.zeros_like(out[-5:]))
        for split_kv in (False, True):
            for bounds in [(batch.max_query_len, batch.max_seq_len), (2048, 1 << 15)]:
                assert torch.equal(kernels.paged_attention(*batch.with_bounds(*bounds).args(), split_kv=split_kv), out)


@pytest.mark.gpu
def test_gpu_rows_do_not_depend_on_how_the_prompt_was_chunked():
    """A 3000-token prompt (six splits) whole and in chunks of 512, 1000 and 1500; its last 40 positions as
    decodes."""
    rng, g = random.Random(22), torch.Generator().manual_seed(22)
    prompt = make_request(rng, g, 3000, 3000, 32, 8, 128, 128, torch.bfloat16)
    assert chunked_prompt_rows_differ(cuda_paged, prompt, (512, 1000, 1500), device="cuda") == []
    whole = cuda_paged(pack([prompt], 16, seed=0).to("cuda"))
    for end in range(2961, 3001):
        decode = Request(prompt.q[end - 1:end], prompt.k[:end], prompt.v[:end])
        assert torch.equal(cuda_paged(pack([decode], 16, seed=end).to("cuda")), whole[end - 1:end]), end


@pytest.mark.gpu
@pytest.mark.parametrize("max_query_len, batch_size", [(1, 1), (1, 48), (16, 8)], ids=["decode1", "decode48", "mixed8"])
def test_gpu_paged_attention_replays_in_a_cuda_graph(max_query_len, batch_size):
    """The op captured with static inputs and static bounds (max_seq_len: the cache's capacity, 8192; max_query_len:
    1 for a uniform decode step, else the step's token budget), replayed after the lengths, block tables and
    queries change in place: the bits of eager calls with the step's own bounds. Padding tokens get 0."""
    g = torch.Generator(device="cuda").manual_seed(23)
    heads, kv_heads, dim, block_size, capacity = 32, 8, 128, 16, 8192
    blocks_per_request = capacity // block_size
    num_blocks = batch_size * blocks_per_request + 7
    cache = torch.randn(num_blocks, kv_heads, block_size, 2 * dim, device="cuda", generator=g).bfloat16()
    key_cache, value_cache = cache.split([dim, dim], dim=-1)
    tokens = batch_size * max_query_len + 3  # static, with padding
    query = torch.randn(tokens, heads, dim, device="cuda", generator=g).bfloat16()
    block_table = torch.zeros(batch_size, blocks_per_request, dtype=torch.int32, device="cuda")
    seq_lens = torch.ones(batch_size, dtype=torch.int32, device="cuda")
    query_start_loc = torch.zeros(batch_size + 1, dtype=torch.int32, device="cuda")
    args = (query, key_cache, value_cache, block_table, seq_lens, query_start_loc, dim**-0.5)

    def new_step(step: int) -> tuple[int, int]:
        q_lens = torch.randint(1, max_query_len + 1, (batch_size,), device="cuda", generator=g)
        lens = q_lens + torch.randint(0, capacity - max_query_len, (batch_size,), device="cuda", generator=g)
        if step == 0:
            lens[0] = capacity  # one full cache
        seq_lens.copy_(lens)
        query_start_loc.copy_(torch.cat([q_lens.new_zeros(1), q_lens.cumsum(0)]))
        block_table.copy_(torch.randperm(num_blocks, device="cuda", generator=g)[:block_table.numel()]
                          .view_as(block_table))
        query.copy_(torch.randn(query.shape, device="cuda", generator=g))
        return int(q_lens.max()), int(lens.max())

    new_step(0)
    torch.ops.bi.paged_attention(*args, max_query_len, capacity)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.bi.paged_attention(*args, max_query_len, capacity)
    for step in range(3):
        bounds = new_step(step)
        graph.replay()
        eager = torch.ops.bi.paged_attention(*args, *bounds)
        assert torch.equal(captured, eager), step
        assert torch.equal(captured[int(query_start_loc[-1]):], torch.zeros_like(captured[int(query_start_loc[-1]):]))


@pytest.mark.gpu
def test_gpu_write_kv_cache_replays_in_a_cuda_graph():
    """The write captured with a static slot mapping, replayed after the slots (padding included) and the keys
    change in place: the cache an eager write gives, and the CPU path's."""
    key, value, key_cache, value_cache, slots = kv_write_case(torch.bfloat16, seed=5, device="cuda")
    torch.ops.bi.write_kv_cache(key, value, key_cache, value_cache, slots)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.bi.write_kv_cache(key, value, key_cache, value_cache, slots)
    for seed in (6, 7):
        new = kv_write_case(torch.bfloat16, seed=seed, device="cuda")
        for static, fresh in zip((key, value, slots), (new[0], new[1], new[4])):
            static.copy_(fresh)
        before = [t.cpu() for t in (key, value, key_cache, value_cache, slots)]
        graph.replay()
        torch.ops.bi.write_kv_cache(*before)
        for on_gpu, on_cpu in zip((key_cache, value_cache), before[2:4]):
            assert torch.equal(on_gpu.cpu().nan_to_num(7.0), on_cpu.nan_to_num(7.0)), seed
