"""Plumbing shared by every ``torch.ops.bi.*`` op: input checks, layout contracts, device routing.

An op file in this folder does two things with it:

1. declares, next to the op, which strides each tensor input may have::

       layout_contract("bi::mm", self=Layout.UNIT_STRIDE_ROWS, mat2=Layout.UNIT_STRIDE_ANY)

   The op checks its inputs against the contract at run time (a violation is an error, never a
   silent copy), and the graph pass reads the same table to insert ``.contiguous()`` exactly where
   a contract is broken;
2. defines the op with ``define_op(schema, fake=..., cpu=..., triton=...)``: the fake impl checks the inputs at
   trace time, CPU tensors go to a pure-PyTorch path, CUDA and Ascend (PrivateUse1) tensors to the Triton kernel.
   The kernels check their inputs too (eager calls need it), memoized on the inputs' metadata
   (``memoized_on_metadata``), so a compiled graph's calls do not pay for it again.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

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


def _metadata(arg):
    """What a check or plan may read of an argument: a tensor's dtype, device, shape and strides (never its data)."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.device, arg.shape, arg.stride()
    return tuple(arg) if isinstance(arg, list) else arg


MEMO_ENTRIES = 1 << 16


def memoized_on_metadata(fn: Callable) -> Callable:
    """Memoize ``fn``, an input check or a launch plan that reads only its arguments' metadata, on that metadata.

    A compiled graph calls a bi op with one layout per input shape, so after its first call with a shape the op's
    run-time checks cost a dictionary lookup; the same bad input still raises every time (a call that raises
    is not memoized), with the same message. Symbolic shapes (the fake impls at trace time) do not hash, and are
    checked on every call."""
    memo: dict = {}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        key = tuple(map(_metadata, args))
        if kwargs:
            key += (*kwargs, *map(_metadata, kwargs.values()))
        try:
            return memo[key]
        except KeyError:
            pass
        except TypeError:  # a SymInt in a shape
            return fn(*args, **kwargs)
        result = fn(*args, **kwargs)
        if len(memo) >= MEMO_ENTRIES:
            memo.clear()
        memo[key] = result
        return result

    wrapper.memo = memo
    return wrapper


def check_dtype(op: str, dtypes: Iterable[torch.dtype] = FLOAT_DTYPES, **tensors: torch.Tensor | None) -> None:
    allowed = tuple(dtypes)
    for name, t in tensors.items():
        if t is not None and t.dtype not in allowed:
            names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
            raise reject(op, f"unsupported dtype {t.dtype} for {name!r} (supported: {names})", **{name: t})


def out_dtype(op: str, x: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The output dtype of a reduction's ``dtype=`` argument (None keeps the input's), checked as ``check_dtype``."""
    out = x.dtype if dtype is None else dtype
    if out not in FLOAT_DTYPES:
        raise reject(op, f"unsupported dtype argument {out} (supported: float16, bfloat16, float32)", self=x)
    return out


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


@memoized_on_metadata
def check_layout(qualname: str, **tensors: torch.Tensor | None) -> None:
    """Raise if a tensor breaks the op's declared contract: the caller must make it contiguous."""
    contract = LAYOUT_CONTRACTS.get(qualname, {})
    for name, t in tensors.items():
        layout = contract.get(name, Layout.ANY)
        if t is not None and not layout.accepts(t):
            raise reject(qualname, f"{name!r} breaks the layout contract ({layout.value}); pass it .contiguous()", **{name: t})


@dataclass(frozen=True)
class NativeLaunch:
    """An op call that the ``native_launch`` pass hands to Inductor as the kernel launch itself: ``trace(*tensors)``
    with the op's tensor arguments named in ``inputs`` returns the op's outputs, launched with
    ``kernels.launch.emit_launch``."""

    inputs: tuple[str, ...]
    trace: Callable[..., tuple[torch.Tensor, ...]]


# "bi::rms_norm" -> fn(arguments by schema name, tensors as fake values) -> NativeLaunch, or None where that call
# must stay an op call (a layout or argument the launch does not take).
NATIVE_LAUNCHES: dict[str, Callable[..., NativeLaunch | None]] = {}


def native_launch(qualname: str):
    """Register the decorated function as ``qualname``'s launch for Inductor to emit (``NATIVE_LAUNCHES``)."""

    def register(fn):
        NATIVE_LAUNCHES[qualname] = fn
        return fn

    return register


# Where Inductor lowers a user's Triton launch: CUDA (the tests add "cpu", whose graphs they run under Triton's
# interpreter: Inductor itself emits no Triton launch for CPU tensors).
NATIVE_LAUNCH_DEVICES = {"cuda"}


def launches_aligned(t: torch.Tensor | None) -> bool:
    """Whether a native launch whose kernel takes ``t``'s strides may read it as given: on a
    ``NATIVE_LAUNCH_DEVICES`` device, its data 16-byte aligned within its storage for every value its symbolic shape
    may take. Inductor then specializes the launch's pointer as aligned, as the op's own launcher does
    (``kernels.launch.aligned16``), so both compile the same kernel. Where the offset is not known to be a multiple
    of 16 bytes, Inductor compiles for an unaligned pointer whatever the pointer turns out to be."""
    return t is None or (t.device.type in NATIVE_LAUNCH_DEVICES
                         and _known(t.storage_offset() * t.element_size() % 16 == 0))


def emits_in_place(t: torch.Tensor | None) -> bool:
    """Whether a native launch of a kernel that assumes contiguous rows may read ``t`` as given:
    ``launches_aligned`` and contiguous."""
    return t is None or (launches_aligned(t) and _known(t.is_contiguous()))


def host_scalar(t: torch.Tensor):
    """The value of a 0-dim CPU tensor, read on the host when the graph being traced runs (``.item()``): a symbolic
    float in the trace, which its fake mode would otherwise refuse as data-dependent."""
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode([t])
    if mode is None:
        return t.item()
    allowed, mode.allow_scalar_outputs = mode.allow_scalar_outputs, True
    try:
        return t.item()
    finally:
        mode.allow_scalar_outputs = allowed


def no_kernel(qualname: str, *tensors: torch.Tensor | None) -> BIInputError:
    devices = sorted({str(t.device) for t in tensors if isinstance(t, torch.Tensor)})
    return BIInputError(f"{qualname}: no batch-invariant kernel for device {', '.join(devices)} (cpu, cuda and npu are supported)")


# The ops are defined with torch.library's low-level API. ``torch.library.custom_op`` would wrap each call in Python
# layers (an autograd function, an output-aliasing check, a Dynamo-disabled wrapper) that cost more host time than
# the kernel launch itself (docs/benchmarks.md, "Prefill outside CUDA graphs"), on every call from compiled code too.
LIBRARY = torch.library.Library("bi", "DEF")


def define_op(schema: str, *, fake: Callable, cpu: Callable, triton: Callable) -> None:
    """Define ``torch.ops.bi.NAME`` from ``schema`` ("NAME(Tensor self, ...) -> Tensor"), with its fake impl (what
    tracing runs) and its kernels: CPU tensors -> ``cpu``, a pure-PyTorch path; CUDA and Ascend NPU (PrivateUse1)
    tensors -> ``triton``, the Triton kernel (compiled by triton-ascend on an NPU, which has not run on NPU hardware).
    Tensors on any other device get a BIInputError. The kernels return fresh tensors, never views of an input."""
    name = schema.split("(", 1)[0]
    qualname = f"bi::{name}"
    LIBRARY.define(schema, tags=(torch.Tag.pt2_compliant_tag,))
    torch.library.register_fake(qualname, fake, lib=LIBRARY)

    def unsupported_device(*args, **kwargs):
        raise no_kernel(qualname, *args, *kwargs.values())

    LIBRARY.impl(name, unsupported_device, "CompositeExplicitAutograd")
    for dispatch_key, kernel in (("CPU", cpu), ("CUDA", triton), ("PrivateUse1", triton)):
        LIBRARY.impl(name, kernel, dispatch_key)


def along_dim(x: torch.Tensor, dim: int, last_dim_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply ``last_dim_fn`` ([..., N] -> same shape, contiguous) along ``dim`` of ``x`` (a row kernel along another
    dim: that dim is moved last, which costs a copy of the input and one of the output); a fresh contiguous result."""
    moved = x.reshape(1) if x.dim() == 0 else x.movedim(dim, -1)
    return last_dim_fn(moved).movedim(-1, dim).contiguous().reshape(x.shape)


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
