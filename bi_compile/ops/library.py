"""Plumbing shared by every ``torch.ops.bi.*`` op: input checks, layout contracts, device routing.

An op file in this folder does three things with it:

1. defines the op with ``torch.library.custom_op("bi::NAME", mutates_args=())`` and a fake impl;
2. declares, next to the op, which strides each tensor input may have::

       layout_contract("bi::mm", self=Layout.UNIT_STRIDE_ROWS, mat2=Layout.UNIT_STRIDE_ANY)

   The op checks its inputs against the contract at run time (a violation is an error, never a
   silent copy), and the graph pass reads the same table to insert ``.contiguous()`` exactly where
   a contract is broken;
3. routes devices with ``register_kernels(op, cpu=..., triton=...)``: CPU tensors go to a
   pure-PyTorch path, CUDA and Ascend (PrivateUse1) tensors to the Triton kernel.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class BIInputError(ValueError):
    """An input a bi op cannot take: wrong dtype, rank, stride or device. Never silently variant."""


def describe(t: torch.Tensor) -> str:
    return f"shape={tuple(t.shape)} stride={tuple(t.stride())} dtype={t.dtype} device={t.device}"


def reject(op: str, reason: str, **tensors: torch.Tensor | None) -> BIInputError:
    """Build the error for ``op``; every tensor involved is named with its shape, strides and dtype."""
    parts = [f"{name}: {describe(t)}" for name, t in tensors.items() if t is not None]
    return BIInputError(f"{op}: {reason} ({'; '.join(parts)})")


def check_dtype(op: str, dtypes: Iterable[torch.dtype] = FLOAT_DTYPES, **tensors: torch.Tensor | None) -> None:
    allowed = tuple(dtypes)
    for name, t in tensors.items():
        if t is not None and t.dtype not in allowed:
            names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
            raise reject(op, f"unsupported dtype {t.dtype} for {name!r} (supported: {names})", **{name: t})


def check_rank(op: str, ranks: Iterable[int], **tensors: torch.Tensor | None) -> None:
    allowed = tuple(ranks)
    for name, t in tensors.items():
        if t is not None and t.dim() not in allowed:
            raise reject(op, f"unsupported rank {t.dim()} for {name!r} (supported: {allowed})", **{name: t})


def _known(cond) -> bool:
    """True only when ``cond`` holds for every value a symbolic shape may take (False if unknown)."""
    if isinstance(cond, bool):  # real tensors, every call: skip the symbolic machinery
        return cond
    from torch.fx.experimental.symbolic_shapes import guard_or_false

    return bool(guard_or_false(cond))


class Layout(enum.Enum):
    """Which strides a kernel can read. ``accepts`` works on real and on fake (symbolic) tensors."""

    ANY = "any strides"
    UNIT_STRIDE_ROWS = "unit stride in the last dim (rows may be strided)"
    UNIT_STRIDE_ANY = "unit stride in one of the last two dims (row- or column-major matrix)"
    CONTIGUOUS = "contiguous"

    def accepts(self, t: torch.Tensor) -> bool:
        if self is Layout.ANY:
            return True
        if self is Layout.CONTIGUOUS:
            return _known(t.is_contiguous())
        size, stride = t.shape, t.stride()
        last_unit = t.dim() == 0 or _known(stride[-1] == 1) or _known(size[-1] <= 1)
        if self is Layout.UNIT_STRIDE_ROWS:
            return last_unit
        prev_unit = t.dim() >= 2 and (_known(stride[-2] == 1) or _known(size[-2] <= 1))
        return last_unit or prev_unit


# "bi::mm" -> {"self": Layout.UNIT_STRIDE_ROWS, "mat2": Layout.UNIT_STRIDE_ANY}
LAYOUT_CONTRACTS: dict[str, dict[str, Layout]] = {}


def layout_contract(qualname: str, **layouts: Layout) -> None:
    """Declare the strides each tensor argument of ``qualname`` accepts (arguments not named: ANY)."""
    LAYOUT_CONTRACTS[qualname] = layouts


def check_layout(qualname: str, **tensors: torch.Tensor | None) -> None:
    """Raise if a tensor breaks the op's declared contract: the caller must make it contiguous."""
    contract = LAYOUT_CONTRACTS.get(qualname, {})
    for name, t in tensors.items():
        layout = contract.get(name, Layout.ANY)
        if t is not None and not layout.accepts(t):
            raise reject(qualname, f"{name!r} breaks the layout contract ({layout.value}); pass it .contiguous()", **{name: t})


def no_kernel(qualname: str, *tensors: torch.Tensor | None) -> BIInputError:
    devices = sorted({str(t.device) for t in tensors if isinstance(t, torch.Tensor)})
    return BIInputError(f"{qualname}: no batch-invariant kernel for device {', '.join(devices)} (cpu, cuda and npu are supported)")


def register_kernels(op, *, cpu: Callable, triton: Callable) -> None:
    """CPU -> pure-PyTorch path; CUDA -> Triton; Ascend NPU (PrivateUse1) -> the same Triton source,
    compiled by triton-ascend. The NPU registration is written for torch-npu but has not run on NPU hardware."""
    op.register_kernel("cpu")(cpu)
    op.register_kernel("cuda")(triton)
    op.register_kernel("privateuseone")(triton)


CPU_ROW_TILE = 16


def map_row_tiles(fn: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, tile: int = CPU_ROW_TILE) -> torch.Tensor:
    """Apply ``fn`` to ``rows`` [M, ...] in blocks of exactly ``tile`` rows, the last one zero-padded.

    This is what makes the CPU path batch-invariant by construction: whatever M is, every library call
    (mm, sum, ...) inside ``fn`` sees the same shape, so it picks the same blocking, threading and
    reduction order, and a row's result cannot depend on how many rows came with it.
    ``fn`` must treat rows independently and return [tile, ...].
    """
    m = rows.shape[0]
    padded = torch.nn.functional.pad(rows, (0, 0) * (rows.dim() - 1) + (0, (-m) % tile)) if m % tile else rows
    if padded.shape[0] == 0:
        return fn(padded.new_zeros((tile,) + tuple(rows.shape[1:])))[:0]
    return torch.cat([fn(block) for block in padded.split(tile)])[:m]
