"""The Ascend blockings (every ``Backend.ASCEND`` entry of the kernels' tables) without an NPU.

Under Triton's interpreter, the ``ascend`` fixture makes CPU tensors take the Ascend target
(``device.CPU_TARGET``), so the launchers pick the Ascend tables and loop over tiles on a few programs as on an
NPU's cores. The kernels then run the Ascend code paths (the 2-D chunked softmax, the single matmul tile per
dtype, the 4096-element row chunks, the smaller attention blocks) against float64 references and the same
invariance draws as the CUDA paths, each with a control that shows the comparison can fail. The sizes of the
tiles are checked against the unified buffer by a count of what each kernel holds at once; the compile check
(tests/ascend/compile_check.py, `make ascend-check`) measures the same from the IR triton-ascend produces.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

pytest.importorskip("triton")

from bi_compile.kernels import attention, device, launch, matmul, reduce, rms_norm, softmax  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton kernels on CPU tensors under TRITON_INTERPRET=1"
)

ASCEND = device.Backend.ASCEND
UB_BYTES = 96 * 1024
MAX_GRID = 65535
# A 910B3: 20 AI cores, 40 vector cores. The interpreter runs fewer, so that tests take the loop over tiles.
NPU = device.Target(ASCEND, cube_cores=20, vector_cores=40)
INTERPRETED_NPU = device.Target(ASCEND, cube_cores=3, vector_cores=5)


@pytest.fixture
def ascend(monkeypatch):
    monkeypatch.setattr(device, "CPU_TARGET", INTERPRETED_NPU)


def _element_bytes(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_matmul_tile_fits_the_unified_buffer(dtype):
    """One tile whatever M: the K loop holds an A chunk, a B chunk and the fp32 accumulator; the epilogue holds
    the accumulator, the bias and their scaled sum, all fp32."""
    (max_m, (tiles,)), = matmul.ASCEND_TILES[dtype]
    e = _element_bytes(dtype)
    k_loop = (tiles.block_m + tiles.block_n) * tiles.block_k * e + tiles.block_m * tiles.block_n * 4
    epilogue = 3 * tiles.block_m * tiles.block_n * 4
    assert max_m >= 1 << 62 and max(k_loop, epilogue) <= UB_BYTES
    assert {matmul.device_tiles(m, 4096, dtype, NPU) for m in (1, 17, 64, 65, 300, 8192, 32768)} == {tiles}
    assert matmul.GROUPED_TILES[ASCEND][dtype] == tiles


def test_the_row_chunks_fit_the_unified_buffer():
    """A row kernel holds at most five fp32 tiles of a chunk at once (the chunk as loaded and as fp32, a running
    sum, an exponential and its product), whatever the row length."""
    policy = reduce.ROW_POLICIES[ASCEND]
    chunks = [reduce.row_blocking(n, split, ASCEND) for n in (1, 100, 1000, 4096, 4097, 151936) for split in (False, True)]
    assert all(cfg.block * cfg.rows <= max(policy.tile_elements, policy.loop.block) for cfg in chunks)
    assert max(cfg.block * cfg.rows for cfg in chunks) * 5 * 4 <= UB_BYTES
    assert policy.loop.block <= 4096 and softmax.LOOPED_ROWS[ASCEND].head_chunks == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_the_attention_blocks_fit_the_unified_buffer(head_dim, dtype):
    """Inside the key loop: q, the split's and the merged fp32 accumulators, and either a K chunk with its scores
    or the probabilities with a V chunk."""
    cfg = attention.attention_config(head_dim, head_dim, dtype, ASCEND)
    e = _element_bytes(dtype)
    held = cfg.block_m * head_dim * (e + 2 * 4)
    chunk = max(head_dim * cfg.block_n * e + cfg.block_m * cfg.block_n * 4,
                cfg.block_m * cfg.block_n * e + cfg.block_n * head_dim * e)
    assert held + chunk <= UB_BYTES


# ---------------------------------------------------------------- grids at 32k tokens

QWEN3 = {"Qwen3-0.6B": (1024, 16, 8, 128, 3072), "Qwen3-8B": (4096, 32, 8, 128, 12288)}  # hidden, heads, kv, D, inter
PREFILL_TOKENS = 32768


def _prefill_grids(monkeypatch, npu: device.Target) -> list[tuple[str, tuple]]:
    """(kernel, grid) of one layer's launches in a 32k-token prefill, recorded instead of run (torch.empty: the
    pages are never touched)."""
    monkeypatch.setattr(device, "CPU_TARGET", npu)
    grids = []
    monkeypatch.setattr(launch.KeyedKernel, "__call__",
                        lambda self, dev, key, grid, *a, **kw: grids.append((self.kernel.fn.__name__, grid)))
    bf16 = dict(dtype=torch.bfloat16)
    for hidden, heads, kv_heads, head_dim, inter in QWEN3.values():
        x = torch.empty(PREFILL_TOKENS, hidden, **bf16)
        rms_norm.add_rms_norm(x, x, torch.empty(hidden, **bf16), 1e-6)
        for n in ((heads + 2 * kv_heads) * head_dim, 2 * inter):
            matmul.matmul(x[None], torch.empty(n, hidden, **bf16).t()[None])
        q_rows = torch.empty(PREFILL_TOKENS * heads, head_dim, **bf16)  # per-head q/k RMSNorm
        rms_norm.rms_norm(q_rows, torch.empty(head_dim, **bf16), 1e-6)
        reduce.row_sum(q_rows, torch.float32, mean=True, square=True)
        q = torch.empty(1, heads, PREFILL_TOKENS, head_dim, **bf16)
        kv = torch.empty(1, kv_heads, PREFILL_TOKENS, head_dim, **bf16)
        attention.attention(q, kv, kv, None, True, 0.1)
        softmax.softmax(torch.empty(PREFILL_TOKENS, 2374, **bf16), torch.float32)
        reduce.row_sum(x.view(-1), torch.float32)
    return grids


def _programs(grid: tuple) -> int:
    programs = 1
    for size in grid:
        programs *= size
    return programs


def test_prefill_grids_stay_within_the_core_count(monkeypatch):
    grids = _prefill_grids(monkeypatch, NPU)
    assert {name for name, _ in grids} >= {"_rms_norm_kernel", "_matmul_kernel", "_row_sum_kernel",
                                           "_attention_kernel", "_softmax_kernel"}
    for name, grid in grids:
        cores = NPU.cube_cores if name == "_matmul_kernel" else NPU.vector_cores
        assert grid[0] <= cores and _programs(grid) <= MAX_GRID, (name, grid)


def test_control_the_cuda_grids_pass_65535_programs_at_32k_tokens(monkeypatch):
    """Control: one program per tile, the CUDA way, asks triton-ascend for more programs than it launches."""
    grids = _prefill_grids(monkeypatch, device.Target(device.Backend.CUDA, cube_cores=20, vector_cores=20))
    assert max(_programs(grid) for _, grid in grids) > MAX_GRID


# ---------------------------------------------------------------- the Ascend paths, interpreted

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}
# bf16 tl.dot is wrong under Triton 3.6's interpreter; the row kernels take bf16 elsewhere in the suite.
DOT_DTYPES = [torch.float32, torch.float16]


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", DOT_DTYPES)
def test_matmul_single_tile_matches_reference_and_is_row_invariant(ascend, dtype):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(1, 150, 200, generator=g).to(dtype)
    b = torch.randn(1, 200, 72, generator=g).to(dtype)
    bias = torch.randn(72, generator=g).to(dtype).expand(1, 150, 72)
    full = matmul.matmul(a, b, bias, alpha=1.5, beta=-0.5)
    assert _relative_error(full, 1.5 * torch.bmm(a.double(), b.double()) - 0.5 * bias.double()) < TOLERANCE[dtype]
    rng = random.Random(2)
    for _ in range(4):
        m = rng.randint(1, 150)
        assert torch.equal(matmul.matmul(a[:, :m], b, bias[:, :m], alpha=1.5, beta=-0.5), full[:, :m])
    if dtype == torch.float16:  # fp32 lone rows: numpy's sgemm depends on a row's place in the tile (test_ops_matmul)
        row = rng.randrange(150)
        assert torch.equal(matmul.matmul(a[:, row:row + 1], b, bias[:, :1], alpha=1.5, beta=-0.5), full[:, row:row + 1])


def test_control_a_k_chunk_that_followed_m_would_change_bits(ascend):
    """Control: the same rows with another K chunk give other fp32 bits, so a tile that changed with M would fail
    the comparison above; the Ascend table has one tile per dtype."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(1, 64, 4096, generator=g), torch.randn(1, 4096, 64, generator=g)
    (_, (tiles,)), = matmul.ASCEND_TILES[torch.float32]
    other = matmul.TileConfig(tiles.block_m, tiles.block_n, 1, 1, block_k=tiles.block_k // 2, persistent=True)
    assert not torch.equal(matmul.matmul(a, b, tiles=tiles), matmul.matmul(a, b, tiles=other))


@pytest.mark.parametrize("dtype", DOT_DTYPES)
def test_grouped_matmul_single_tile_matches_reference(ascend, dtype):
    g = torch.Generator().manual_seed(4)
    a = torch.randn(90, 64, generator=g).to(dtype)
    b = torch.randn(3, 64, 40, generator=g).to(dtype)
    ends = torch.tensor([30, 30, 80], dtype=torch.int32)
    out = matmul.grouped_matmul(a, b, ends)
    ref = torch.cat([a[:30].double() @ b[0].double(), a[30:80].double() @ b[2].double(), torch.zeros(10, 40).double()])
    assert _relative_error(out, ref) < TOLERANCE[dtype]


ROW_OPS = {
    "softmax": (lambda x: softmax.softmax(x, torch.float32), lambda x: torch.softmax(x.double(), -1)),
    "log_softmax": (lambda x: softmax.softmax(x, torch.float32, log=True), lambda x: torch.log_softmax(x.double(), -1)),
    "rms_norm": (lambda x: rms_norm.rms_norm(x, None, 1e-6)[0].float(),
                 lambda x: x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)),
    "mean_square": (lambda x: reduce.row_sum(x, torch.float32, mean=True, square=True),
                    lambda x: x.double().pow(2).mean(-1)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", ROW_OPS)
@pytest.mark.parametrize("n", [1000, 10000])  # packed rows; rows of three 4096-long chunks (the 2-D online softmax)
def test_row_ops_match_reference_and_are_row_invariant(ascend, name, n, dtype):
    op, ref = ROW_OPS[name]
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(40, n, generator=g) * 3).to(dtype)
    full = op(x)
    tolerance = 1e-5 if dtype == torch.float32 or name == "mean_square" else 2e-3
    torch.testing.assert_close(full.double(), ref(x), rtol=tolerance, atol=tolerance)
    rng = random.Random(n)
    for _ in range(3):
        m = rng.randint(1, 40)
        start = rng.randrange(40 - m + 1)
        assert torch.equal(op(x[start:start + m]), full[start:start + m])
    row = rng.randrange(40)
    assert torch.equal(op(x[row]), full[row])


def test_softmax_2d_chunks_keep_torch_nan_and_inf_rules(ascend):
    x = torch.randn(4, 10000)
    x[0] = float("-inf")
    x[1, 7000] = float("nan")
    x[2, 123] = float("inf")
    x[3, :5000] = float("-inf")
    y = softmax.softmax(x, torch.float32)
    assert y[:3].isnan().all()
    torch.testing.assert_close(y[3].double(), torch.softmax(x[3].double(), -1), rtol=1e-5, atol=1e-6)


def test_control_a_chunk_that_followed_m_would_change_softmax_bits(ascend):
    """Control: another chunk length gives other bits for the same rows, so a blocking that followed M would fail
    the comparisons above; the Ascend blocking is a function of N alone."""
    x = torch.randn(8, 10000, generator=torch.Generator().manual_seed(5)) * 3
    default = reduce.row_blocking(10000, backend=ASCEND)
    other = reduce.RowBlocking(default.block // 2, 1, False, 1)
    assert not torch.equal(softmax.softmax(x, torch.float32), softmax.softmax(x, torch.float32, blocking=other))


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 256])
def test_attention_blocks_match_reference_and_are_batch_invariant(ascend, head_dim, dtype):
    g = torch.Generator().manual_seed(head_dim)
    q = torch.randn(3, 4, 5, head_dim, generator=g).to(dtype)
    kv = torch.randn(3, 2, 600, head_dim, generator=g).to(dtype)
    full = attention.attention(q, kv, kv, None, True, head_dim**-0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), kv.double().repeat_interleave(2, 1), kv.double().repeat_interleave(2, 1),
        attn_mask=torch.ones(5, 600, dtype=torch.bool).tril(), scale=head_dim**-0.5)
    assert _relative_error(full, ref) < 2 * TOLERANCE[dtype]
    assert torch.equal(attention.attention(q[1:2], kv[1:2], kv[1:2], None, True, head_dim**-0.5), full[1:2])
    split = attention.attention(q, kv, kv, None, True, head_dim**-0.5, split_kv=True)
    assert torch.equal(split, full)
