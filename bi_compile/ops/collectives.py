"""``bi::all_reduce``: a sum over the ranks of a process group whose per-element order depends only on the world size.

    all_reduce(input, group_name) -> y,  y = round(((p[0] + p[1]) + p[2]) + ... + p[W-1]),  p[r] = ``input`` of rank r

A stock all-reduce (NCCL, gloo, HCCL) picks its algorithm (ring or tree), its chunking and its channel count from the
message size, which follows the batch; with three or more ranks the association of each element's sum changes with
it, so a row's result depends on the batch. Here every rank gathers all partials into a ``[W, ...]`` tensor with
an all-gather (a copy: no arithmetic happens in the transport) and adds them itself, left to right in
rank order, in fp32, rounding once to the input dtype. Every rank computes the same bits, and an element's sum is
the same whatever else is in the message.

Cost: the all-gather moves W times the bytes of a reduce-scatter + all-gather all-reduce's result per rank, and
each rank does W - 1 elementwise adds over the whole tensor (docs/design.md, "bi.all_reduce").

``group_name`` is a torch.distributed process group's name (``ProcessGroup.group_name``, what functional collectives
take), resolved with ``torch.distributed``'s own ``_resolve_process_group``. The transport is c10d's: gloo for CPU
tensors, NCCL for CUDA tensors. Inside a CUDA graph the op is as capturable as c10d's NCCL all-gather is (it
allocates only the gather buffer and the sum, both of the input's size times W or 1); not yet run on a GPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from bi_compile.ops import library

OP = "bi::all_reduce"


def resolve_group(group_name: str) -> dist.ProcessGroup:
    """The process group named ``group_name``; a BIInputError naming the op if there is none."""
    if not dist.is_available() or not dist.is_initialized():
        raise library.BIInputError(f"{OP}: torch.distributed is not initialized, so there is no group {group_name!r}")
    from torch.distributed.distributed_c10d import _resolve_process_group

    try:
        return _resolve_process_group(group_name)
    except (ValueError, RuntimeError, KeyError) as error:  # torch raises one of these by version
        raise library.BIInputError(f"{OP}: no process group named {group_name!r} ({error})") from None


def _check(x: torch.Tensor, group_name: str) -> dist.ProcessGroup:
    library.check_dtype(OP, input=x)
    return resolve_group(group_name)


def _fake(x, group_name):
    _check(x, group_name)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _all_reduce(x, group_name):
    """All-gather the partials, then add them in rank order in fp32 (the same code on every device: the sum is W - 1
    elementwise adds, each element's order fixed by construction, so no Triton kernel is needed for it)."""
    world = _check(x, group_name).size()
    # torch's functional all-gather (what compiled code calls; the same in torch 2.11 to 2.13): rank r's input lands
    # at rows [r * n, (r + 1) * n) of the flat result.
    gathered = torch.ops._c10d_functional.all_gather_into_tensor(x.contiguous().reshape(-1), world, group_name)
    partials = torch.ops._c10d_functional.wait_tensor(gathered).view(world, *x.shape)
    total = partials[0].to(torch.float32, copy=True)  # a fresh result, never a view that keeps the W-fold buffer
    for partial in partials[1:]:
        total.add_(partial)  # fp32 += partial widened exactly: one rounding per add, in rank order
    return total.to(x.dtype)


library.define_op("all_reduce(Tensor input, str group_name) -> Tensor", fake=_fake, cpu=_all_reduce,
                  triton=_all_reduce)
