"""``bi.all_reduce`` and the tensor-parallel rows of the pass, on CPU with gloo.

Four gloo ranks (spawned once for the module, bounded in time) check that the op's result is exactly the rank-order
fp32 sum on every rank, and that a toy row-parallel MLP compiled with ``bi_ascend`` (its functional all-reduce
replaced by the pass) is bitwise invariant over batch 1..64 at random rows. Two controls can fail: the same MLP with
the stock gloo all-reduce (everything else already bi ops), and a plain ring-style sum whose chunking follows the
message size, the way NCCL's algorithm choice does. With two ranks a + b is commutative and exact, so only three or
more ranks can show the failure; hence four.

The rest (errors, fake impl, the table rows, the audit) runs in this process on a one-rank gloo group.
"""

from __future__ import annotations

import functools
import os
import queue
import socket
import time
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp
from torch._dynamo.backends.common import aot_autograd

import bi_compile
from bi_compile.ops.library import BIInputError
from bi_compile.passes import run_pipeline

WORLD = 4
RANKS_TIMEOUT_S = 120  # spawning 4 interpreters that import torch and compile two graphs: ~20 s on 2 idle cores
BATCHES = range(1, 65)


@dataclass(frozen=True)
class Setup:
    """Where the ranks run: the transport, and the MLP's width and dtype there."""

    device: str
    backend: str
    d_model: int
    dtype: torch.dtype


CPU = Setup("cpu", "gloo", 64, torch.float32)
# On GPUs the messages span decode to prefill sizes (batch 1..64 x 4096 bf16: 8 KiB to 512 KiB), where NCCL changes
# its protocol and algorithm.
GPU = Setup("cuda", "nccl", 4096, torch.bfloat16)


# ---- the four ranks ---------------------------------------------------------------------------------------------


class RowParallelMLP(torch.nn.Module):
    """Megatron's MLP on one rank: a column-parallel up projection (this rank's quarter of the hidden units), then a
    row-parallel down projection whose partial outputs are summed over the ranks."""

    def __init__(self, rank: int, group_name: str, setup: Setup, all_reduce=None):
        super().__init__()
        torch.manual_seed(0)  # the full weights, the same on every rank; each keeps its slice
        d_model, d_hidden = setup.d_model, 4 * setup.d_model
        up, down = torch.randn(d_hidden, d_model) / d_model**0.5, torch.randn(d_model, d_hidden) / d_hidden**0.5
        units = slice(rank * d_hidden // WORLD, (rank + 1) * d_hidden // WORLD)
        self.up = torch.nn.Parameter(up[units].to(setup.device, setup.dtype))
        self.down = torch.nn.Parameter(down[:, units].contiguous().to(setup.device, setup.dtype))
        self.group_name = group_name
        self.all_reduce = all_reduce or functools.partial(funcol.all_reduce, reduceOp="sum", group=group_name)

    def forward(self, x):
        partial = torch.nn.functional.gelu(x @ self.up.t()) @ self.down.t()
        return self.all_reduce(partial)


def probe_changes(forward, setup: Setup) -> list[int]:
    """The batch sizes at which a probe row's output, at a random row of a random batch, differs from it alone."""
    generator = torch.Generator().manual_seed(1)  # the same batches on every rank
    probe = torch.randn(1, setup.d_model, generator=generator).to(setup.device, setup.dtype)
    alone = forward(probe)
    changed = []
    for batch in BATCHES:
        x = torch.randn(batch, setup.d_model, generator=generator).to(setup.device, setup.dtype)
        row = int(torch.randint(batch, (1,), generator=generator))
        x[row] = probe[0]
        if not torch.equal(forward(x)[row], alone[0]):
            changed.append(batch)
    return changed


def rank_checks(rank: int, port: int, setup: Setup, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    if setup.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(setup.backend, rank=rank, world_size=WORLD)
    try:
        group = dist.group.WORLD.group_name
        out = {}
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(3, 37, generator=torch.Generator().manual_seed(rank)).to(setup.device, dtype)
            partials = [torch.empty_like(x) for _ in range(WORLD)]
            dist.all_gather(partials, x)
            rank_order = partials[0].float()
            for partial in partials[1:]:
                rank_order = rank_order + partial.float()
            reduced = torch.ops.bi.all_reduce(x, group)
            everyone = [torch.empty_like(reduced) for _ in range(WORLD)]
            dist.all_gather(everyone, reduced)
            out[f"rank order {dtype}"] = torch.equal(reduced, rank_order.to(dtype))
            out[f"same on every rank {dtype}"] = all(torch.equal(r, reduced) for r in everyone)

        bi_compile.clear_reports()
        compiled = torch.compile(RowParallelMLP(rank, group, setup), backend="bi_ascend", dynamic=True)
        with torch.no_grad():
            out["bi_ascend changed"] = probe_changes(compiled, setup)
            out["rewrites"] = bi_compile.Report.merge(bi_compile.reports()).rewrites
            out["left"] = [(f.target, f.kind) for r in bi_compile.reports() for f in r.findings]
            # Control: the matmuls as bi ops, the collective stock gloo; only the all-reduce can vary.
            stock = RowParallelMLP(rank, group, setup, all_reduce=lambda p: funcol.all_reduce(p, "sum", group).wait())
            stock_mlp = lambda x: stock.all_reduce(  # noqa: E731
                torch.ops.bi.linear(torch.nn.functional.gelu(torch.ops.bi.linear(x, stock.up, None)), stock.down, None))
            out["stock changed"] = probe_changes(stock_mlp, setup)
        results.put((rank, out))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(setup: Setup) -> dict[int, dict]:
    """``rank_checks`` on WORLD spawned ranks; each rank's results, or a failure once RANKS_TIMEOUT_S has passed."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=rank_checks, args=(rank, port, setup, results), daemon=True)
                 for rank in range(WORLD)]
    for process in processes:
        process.start()
    deadline, found = time.monotonic() + RANKS_TIMEOUT_S, {}
    try:
        while len(found) < WORLD:
            rank, out = results.get(timeout=max(deadline - time.monotonic(), 0.1))
            found[rank] = out
    except queue.Empty:
        pytest.fail(f"the {WORLD} {setup.backend} ranks did not finish within {RANKS_TIMEOUT_S} s (ranks done: {sorted(found)})")
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    return found


@pytest.fixture(scope="module")
def four_ranks() -> dict[int, dict]:
    return run_ranks(CPU)


def test_all_reduce_is_the_rank_order_fp32_sum_on_every_rank(four_ranks):
    for rank, out in four_ranks.items():
        checks = {k: v for k, v in out.items() if k.startswith(("rank order", "same on every rank"))}
        assert checks and all(checks.values()), (rank, checks)


def test_row_parallel_mlp_is_invariant_with_the_pass(four_ranks):
    for rank, out in four_ranks.items():
        assert out["rewrites"].get("_c10d_functional.all_reduce.default -> bi.all_reduce", 0) >= 1, out["rewrites"]
        assert out["left"] == [], out["left"]  # the wait_tensor went with its all-reduce; nothing variant is left
        assert out["bi_ascend changed"] == [], (rank, out["bi_ascend changed"])


def test_control_the_stock_gloo_all_reduce_varies_with_the_batch(four_ranks):
    """The same MLP with its matmuls already bi ops: any change comes from the stock all-reduce."""
    assert all(out["stock changed"] for out in four_ranks.values()), {r: o["stock changed"] for r, o in four_ranks.items()}


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason=f"needs {WORLD} CUDA GPUs on one host (NCCL at {WORLD} "
                    "ranks; the multi-GPU machines were withheld when this was written, so it has never run)")
def test_on_four_gpus_nccl_ranks_are_invariant_with_the_pass_and_stock_nccl_is_not():
    ranks = run_ranks(GPU)
    for rank, out in ranks.items():
        checks = {k: v for k, v in out.items() if k.startswith(("rank order", "same on every rank"))}
        assert all(checks.values()), (rank, checks)
        assert out["rewrites"].get("_c10d_functional.all_reduce.default -> bi.all_reduce", 0) >= 1, out["rewrites"]
        assert out["bi_ascend changed"] == [], (rank, out["bi_ascend changed"])
    assert all(out["stock changed"] for out in ranks.values()), {r: o["stock changed"] for r, o in ranks.items()}


TREE_BELOW_ELEMENTS = 1024  # where this stand-in for NCCL switches from a tree to a ring


def stock_like_sum(partials: torch.Tensor) -> torch.Tensor:
    """A sum over ``partials`` [W, ...] associated the way a transport that picks its algorithm by message size
    does: a small message goes up a tree, (p0 + p1) + (p2 + p3); a larger one round a ring, cut into W chunks, chunk c
    summed starting at rank c + 1. Where a row lands, and so its order, depends on the message."""
    world = partials.shape[0]
    flat = partials.reshape(world, -1)
    if flat.shape[1] < TREE_BELOW_ELEMENTS:
        return ((flat[0] + flat[1]) + (flat[2] + flat[3])).reshape(partials.shape[1:])
    pieces = []
    for c, span in enumerate(torch.arange(flat.shape[1]).tensor_split(world)):
        order = [(c + 1 + i) % world for i in range(world)]
        total = flat[order[0], span]
        for rank in order[1:]:
            total = total + flat[rank, span]
        pieces.append(total)
    return torch.cat(pieces).reshape(partials.shape[1:])


def test_control_a_sum_associated_by_message_size_varies_with_the_batch():
    """What a transport that picks its algorithm and chunking from the message size does to one row, at a random
    row of batches 1..64 (no processes needed); bi.all_reduce's fixed rank order is the same sum at every size."""
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(WORLD, 1, CPU.d_model, generator=generator)  # [rank, row, feature]: each rank's partial
    alone = stock_like_sum(probe)[0]
    changed = []
    for batch in BATCHES:
        partials = torch.randn(WORLD, batch, CPU.d_model, generator=generator)
        row = int(torch.randint(batch, (1,), generator=generator))
        partials[:, row] = probe[:, 0]
        if not torch.equal(stock_like_sum(partials)[row], alone):
            changed.append(batch)
    assert changed


# ---- one rank, in this process ----------------------------------------------------------------------------------


@pytest.fixture
def one_rank(tmp_path):
    """A one-rank gloo group for this test only (torch.distributed's state is process-wide)."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield dist.group.WORLD.group_name
    finally:
        dist.destroy_process_group()


def test_one_rank_returns_its_input_in_a_fresh_tensor(one_rank):
    x = torch.randn(5, 7, dtype=torch.bfloat16)
    y = torch.ops.bi.all_reduce(x, one_rank)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64])
def test_unsupported_dtype_is_refused_naming_the_op(one_rank, dtype):
    with pytest.raises(BIInputError, match=r"bi::all_reduce: unsupported dtype"):
        torch.ops.bi.all_reduce(torch.ones(3, dtype=dtype), one_rank)


def test_unknown_group_is_refused_naming_the_op(one_rank):
    with pytest.raises(BIInputError, match=r"bi::all_reduce: no process group named 'no-such-group'"):
        torch.ops.bi.all_reduce(torch.ones(3), "no-such-group")


def test_without_torch_distributed_the_op_says_so():
    with pytest.raises(BIInputError, match=r"bi::all_reduce: torch.distributed is not initialized"):
        torch.ops.bi.all_reduce(torch.ones(3), "0")


def test_fake_impl_gives_a_contiguous_tensor_of_the_input_shape_and_checks(one_rank):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = torch.ops.bi.all_reduce(torch.empty(4, 6, dtype=torch.float16).t(), one_rank)
        assert y.shape == (6, 4) and y.dtype == torch.float16 and y.is_contiguous()
        with pytest.raises(BIInputError, match=r"bi::all_reduce: unsupported dtype"):
            torch.ops.bi.all_reduce(torch.empty(3, dtype=torch.int64), one_rank)


def rewritten(reduce_op: str, group: str, dtype=torch.float32):
    """(graph module, report) of a functional all-reduce and its wait_tensor, compiled through aot_autograd with the
    pipeline on the forward graph (how ``bi_ascend`` hands it over, source lines included)."""
    seen = []

    def forward(gm, _inputs):
        seen.append((gm, run_pipeline(gm.graph)))
        gm.recompile()
        return gm

    def tp_out(x):
        return funcol.all_reduce(x * 2, reduce_op, group) + 1

    torch._dynamo.reset()
    torch.compile(tp_out, backend=aot_autograd(fw_compiler=forward, decompositions={}), fullgraph=True)(
        torch.ones(3, 4, dtype=dtype))
    (gm, report), = seen
    return gm, report


def targets(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def test_the_pass_replaces_a_sum_all_reduce_and_drops_its_wait(one_rank):
    gm, report = rewritten("sum", one_rank)
    assert report.rewrites == {"_c10d_functional.all_reduce.default -> bi.all_reduce": 1}
    assert "bi.all_reduce.default" in targets(gm)
    assert not [t for t in targets(gm) if t.startswith("_c10d_functional")]
    x = torch.randn(3, 4)
    (out,) = gm(x)
    assert torch.equal(out, x * 2 + 1)  # one rank: the sum is the input


@pytest.mark.parametrize(("reduce_op", "dtype", "kind"), [("avg", torch.float32, "variant"),
                                                          ("max", torch.float32, None), ("sum", torch.int32, None)])
def test_all_reduces_the_pass_leaves_are_audited(one_rank, reduce_op, dtype, kind):
    """Negative rows: an average is left and reported variant with its source line; max and integer sums are
    exact in any order, so they are left and count as invariant."""
    _, report = rewritten(reduce_op, one_rank, dtype)
    assert report.rewrites == {}
    findings = [(f.target, f.kind) for f in report.findings]
    if kind is None:
        assert findings == []
    else:
        assert findings == [("_c10d_functional.all_reduce.default", kind)]
        assert "test_collectives.py" in report.findings[0].source
