"""Launch a Triton kernel through the binaries it compiled, keyed by the caller: no per-call argument binding.

``kernel[grid](*args, **meta)`` (Triton's ``JITFunction.run``) binds and specialises every argument in Python on
each launch, which costs more host time than the launch itself (about 32 against 14 us on the H200 host:
docs/benchmarks.md, "Prefill outside CUDA graphs"). ``KeyedKernel`` takes that path once per caller key, keeps the
binary Triton returns, and from then on calls the binary's launcher directly.

The caller's key must therefore determine everything Triton specialises a launch on:

- every constexpr and launch option (``meta``);
- each tensor argument's dtype and whether its data is 16-byte aligned;
- each int argument not in the kernel's ``do_not_specialize``: whether it is 1 and whether it is a multiple of 16
  (and every int's width: 32 bits, or 64 above 2**31 - 1).

The launchers key on the shapes, strides and dtypes these follow from, plus ``aligned16`` of each tensor. With
``BI_COMPILE_CHECK_LAUNCH_KEYS=1`` every keyed launch also asks Triton for its binary and raises if a key ever maps
to another one (the GPU tests run so). The direct call is Triton 3.6's calling convention on CUDA; elsewhere (the
interpreter, triton-ascend) every launch takes Triton's own path.

``emit_launch`` is the other way a launch can go: written into a graph being traced, for Inductor to emit in its
own generated code (passes/native_launch.py), with no Python of ours on the call at all.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Callable

import torch
import triton

try:
    from triton import knobs
    from triton.compiler.compiler import CompiledKernel
except ImportError:  # Triton < 3.4 (triton-ascend): no direct calls
    knobs = CompiledKernel = None

CHECK_KEYS = os.environ.get("BI_COMPILE_CHECK_LAUNCH_KEYS") == "1"
# Keys hold run-time sizes (a graph meets one per batch size), so the table is bounded; a cleared key costs one
# launch through Triton's own path.
MAX_KEYS = 1 << 16


def cdiv(a: int, b: int) -> int:
    """Host-side ceil division: ``triton.cdiv`` is a jitted function whose Python call costs a few microseconds."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Host-side ``triton.next_power_of_2`` (also jitted) for n >= 1."""
    return 1 << (n - 1).bit_length()


def aligned16(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


class LaunchKeyError(RuntimeError):
    """A launch key that does not determine the binary: a bug in the launcher that built it."""


class KeyedKernel:
    """``KeyedKernel(kernel)(device, key, grid, *args, **meta)`` launches ``kernel[grid](*args, **meta)`` on
    ``device``; ``args`` are the kernel's leading parameters, ``meta`` names every other one and the options."""

    def __init__(self, kernel: triton.runtime.JITFunction):
        self.kernel = kernel
        self.binaries: dict = {}  # key -> (binary, the constexprs in signature order)

    def __call__(self, device: torch.device, key, grid: tuple[int, ...], *args, **meta) -> None:
        entry = self.binaries.get(key)
        if entry is None:
            binary = self.kernel[grid](*args, **meta)
            if device.type == "cuda" and CompiledKernel is not None and isinstance(binary, CompiledKernel):
                if len(self.binaries) >= MAX_KEYS:
                    self.binaries.clear()
                names = self.kernel.arg_names[len(args):]
                self.binaries[key] = binary, tuple(meta[name] for name in names)
            return
        binary, constexprs = entry
        if CHECK_KEYS:
            found = self.kernel.run(*args, grid=grid, warmup=True, **meta)
            if found is not binary:
                raise LaunchKeyError(f"{self.kernel.fn.__name__}: launch key {key!r} maps to two binaries")
        stream = triton.runtime.driver.active.get_current_stream(device.index)
        enter_hook, exit_hook = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        if _is_set(enter_hook) or _is_set(exit_hook):  # a profiler's hooks: give them what Triton's path gives
            launch_metadata = binary.launch_metadata(grid, stream, *args, *constexprs)
        else:  # none: the launcher then builds no metadata and calls nothing (Triton's path calls the empty chains)
            launch_metadata = enter_hook = exit_hook = None
        binary.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream, binary.function,
                   binary.packed_metadata, launch_metadata, enter_hook, exit_hook, *args, *constexprs)


def _is_set(hook) -> bool:
    """Whether a launch hook would call anything: Triton 3.6's knobs hold a chain of hooks, possibly empty."""
    return bool(hook.calls) if hasattr(hook, "calls") else hook is not None


def emit_launch(kernel: triton.runtime.JITFunction, grid: tuple, outputs: dict[str, torch.Tensor], num_warps: int,
                num_stages: int | None = None, *, in_place: bool = False, tma_blocks: dict | None = None,
                **args) -> dict[str, torch.Tensor]:
    """``kernel[grid](**args, **outputs)`` as a node of the graph being traced (``make_fx``): the higher-order op
    that ``torch.library.wrap_triton`` records, so that Inductor lowers the launch itself and emits it in its
    generated code like one of its own kernels, with no custom-op dispatch or Python launcher of ours at run time.
    ``outputs`` are the fresh tensors the kernel writes (nothing else is written); ``grid`` and the int ``args``
    may be symbolic. ``tma_blocks`` names the tensor arguments the kernel takes as TMA descriptors, with their block
    shapes: Inductor builds each descriptor from the tensor (Triton's ``TensorDescriptor.from_tensor``) at the
    launch. Returns the written ``outputs`` by name.

    The launch is recorded in its functional form, which Inductor's post-grad passes reinplace into ``outputs``;
    ``in_place`` records the in-place form instead, for a graph no post-grad pass will see (a ``cond`` branch made
    after Inductor ran its passes over the branches), where the functional form would cost a copy."""
    from torch._higher_order_ops.triton_kernel_wrap import (kernel_side_table, triton_kernel_wrapper_functional,
                                                            triton_kernel_wrapper_mutation)
    from torch.fx.node import base_types

    every = {**args, **outputs}
    graphable = {name: value for name, value in every.items() if isinstance(value, base_types)}
    launch = dict(
        kernel_idx=kernel_side_table.add_kernel(_one_config(kernel, num_warps, num_stages)),
        constant_args_idx=kernel_side_table.add_constant_args({k: v for k, v in every.items() if k not in graphable}),
        grid=[tuple(grid) + (1,) * (3 - len(grid))],
        tma_descriptor_metadata={name: ("stable", (list(block),)) for name, block in (tma_blocks or {}).items()},
        kwargs=graphable,
    )
    if in_place:
        triton_kernel_wrapper_mutation(**launch)
        return outputs
    written = triton_kernel_wrapper_functional(**launch, tensors_to_clone=list(outputs))
    return {name: written[name] for name in outputs}


# ``bi::exact_strides``: a tensor held to the strides it is traced with, for the ``cond`` operands below
# (``launch_cond``). Inductor's own ``prims.inductor_force_stride_order`` does that by ordering the strides, which
# torch 2.11's Inductor cannot do when they are symbolic ("cannot determine truth value of Relational": it has no
# shape env there); Inductor's ``require_exact_strides``, which its lowering of this op calls, compares them.
_LAUNCH_LIBRARY = torch.library.Library("bi", "FRAGMENT")
_LAUNCH_LIBRARY.define("exact_strides(Tensor input, SymInt[] stride) -> Tensor")


def _exact_strides(input: torch.Tensor, stride: list[int]) -> torch.Tensor:
    """Outside Inductor (a graph run as it is): a copy with ``stride`` (an op's output never aliases its input)."""
    return torch.empty_strided(input.shape, stride, dtype=input.dtype, device=input.device).copy_(input)


_LAUNCH_LIBRARY.impl("exact_strides", _exact_strides, "CompositeExplicitAutograd")
torch.library.register_fake("bi::exact_strides", lambda input, stride: input.new_empty_strided(input.shape, stride),
                            lib=_LAUNCH_LIBRARY)


@functools.cache
def lower_exact_strides() -> None:
    """Teach Inductor ``bi::exact_strides``: the input itself where its layout already has the strides (an input, a
    view Inductor keeps), else its layout frozen to them (a pointwise result: no copy) or, failing that, a copy."""
    from torch._inductor.ir import ExternKernel
    from torch._inductor.lowering import register_lowering

    register_lowering(torch.ops.bi.exact_strides.default, type_promotion_kind=None)(
        lambda input, stride: ExternKernel.require_exact_strides(input, stride))


# The size symbols a ``cond`` passes its branches ahead of its tensors (``launch_cond``), set by the pass that
# traces the launch (passes/native_launch.py) and, inside a branch, by the branch to its own.
_COND_SYMBOLS: contextvars.ContextVar[tuple] = contextvars.ContextVar("bi_cond_symbols", default=())


@contextlib.contextmanager
def cond_symbols(symbols: tuple):
    """Trace launches with ``symbols`` (SymInts, each a bare size symbol of the traced graph) as the ones every
    ``launch_cond`` passes to its branches."""
    token = _COND_SYMBOLS.set(tuple(symbols))
    try:
        yield
    finally:
        _COND_SYMBOLS.reset(token)


def launch_cond(pred, on_true: Callable, on_false: Callable, tensors: tuple[torch.Tensor, ...]) -> tuple:
    """``torch.ops.higher_order.cond(pred, on_true, on_false, tensors)`` for branches that launch kernels
    (``emit_launch``; the operator itself, not ``torch.cond``, which would have Dynamo trace the branches, and
    Dynamo cannot trace Triton's autotuner being built), with what Inductor needs of such a ``cond``:

    - each dense tensor held to the strides it is traced with. The branches read it through those strides, but
      Inductor fixes the layout of a launch's operands (its ``triton_kernel_default_layout_constraint``), not of a
      ``cond``'s (``ir.Conditional.create`` fixes only the outputs), and may lay a pointwise result, a RoPE'd query
      say, out in another order. A view with gaps (a slice of an input) keeps its layout in Inductor anyway;
    - the size symbols (``cond_symbols``) passed first: Inductor binds a branch's symbols from its inputs alone,
      and stops on an input of size ``s0*s1`` (a flattened batch) whose ``s0`` and ``s1`` no input binds.

    Branches return tuples: Inductor lowers a ``cond``'s outputs as a sequence."""
    from torch._prims_common import is_non_overlapping_and_dense_or_false

    lower_exact_strides()
    symbols = _COND_SYMBOLS.get()

    def branch(fn: Callable) -> Callable:
        def run(*operands):
            with cond_symbols(operands[:len(symbols)]):
                return fn(*operands[len(symbols):])
        return run

    held = tuple(torch.ops.bi.exact_strides(t, t.stride()) if is_non_overlapping_and_dense_or_false(t) else t
                 for t in tensors)
    return torch.ops.higher_order.cond(pred, branch(on_true), branch(on_false), (*symbols, *held))


@functools.cache
def _one_config(kernel: triton.runtime.JITFunction, num_warps: int, num_stages: int | None):
    """The kernel with its launch options as the one config of an autotuner (how torch.compile passes a user
    kernel's num_warps and num_stages to Inductor); one object per options, as the side table keys on identity."""
    options = {"num_warps": num_warps} | ({} if num_stages is None else {"num_stages": num_stages})
    return triton.autotune(configs=[triton.Config({}, **options)], key=[])(kernel)
