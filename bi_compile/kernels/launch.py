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
"""

from __future__ import annotations

import os

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
