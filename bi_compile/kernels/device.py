"""What a kernel is compiled for: the key of every per-device table in this folder.

Each kernel file keeps one table of blockings keyed by ``Backend`` (matmul tiles, row blockings, attention blocks);
a launcher looks its entry up with ``target(tensor.device)`` and never branches on the device anywhere else.

- ``Backend.CUDA``: Triton's NVIDIA backend. Tiles may follow the run-time M; one program per tile unless a table
  entry says persistent.
- ``Backend.ASCEND``: triton-ascend on a 910B/A3 NPU. Every program is a persistent loop over tiles on a grid of at
  most the core count (``cube_cores`` AI cores for ``tl.dot`` kernels, ``vector_cores`` for the others), because
  triton-ascend refuses grids above 65535 programs and runs each program to completion on one core; every live
  tile fits the 96 KB of unified buffer a core has with double buffering on (docs/ascend.md).

CPU tensors run under Triton's interpreter, which executes either backend's code: ``CPU_TARGET`` says which. It
is the CUDA paths with few programs by default; the Ascend tests and the Ascend compile check (tests/ascend/compile_check.py)
set an Ascend target there, so that the Ascend blockings run and compile without an NPU.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

import torch
import triton


class Backend(enum.Enum):
    CUDA = "cuda"
    ASCEND = "ascend"


@dataclass(frozen=True)
class Target:
    backend: Backend
    cube_cores: int  # programs that run tl.dot kernels at once: SMs on CUDA, AI cores on Ascend
    vector_cores: int  # programs that run the other kernels at once: SMs on CUDA, vector cores on Ascend
    tma: bool = False  # a CUDA device with the tensor memory accelerator (Hopper or newer)

    def dot_precision(self, dtype: torch.dtype) -> str | None:
        """``input_precision`` of every ``tl.dot``. fp32 is "ieee" everywhere (fp32 means fp32, never TF32/HF32).
        fp16/bf16 on CUDA keep Triton's default (None: the tensor-core path whose bits the GPU tests verified).
        triton-ascend allows only "ieee" and "hf32" and substitutes its default only for a literal None, not for a
        None passed through a constexpr (its semantic.dot then fails on NPUOptions.default_dot_input_precision), so
        Ascend says "ieee": fp16/bf16 products are exact in the fp32 accumulator either way."""
        if dtype == torch.float32 or self.backend is Backend.ASCEND:
            return "ieee"
        return None

    def programs(self, tiles: int, cores: int) -> int:
        """Programs for ``tiles`` independent tiles of a kernel that loops over them: one per tile on CUDA, at most
        ``cores`` on Ascend."""
        return min(tiles, cores) if self.backend is Backend.ASCEND else tiles


# Triton's interpreter: the CUDA code paths, with few programs so that tests run the loops over tiles.
CPU_TARGET = Target(Backend.CUDA, cube_cores=4, vector_cores=4)


def target(device: torch.device) -> Target:
    """The target of kernels launched on ``device``: CUDA, an Ascend NPU, or ``CPU_TARGET`` for CPU tensors."""
    if device.type == "cpu":
        return CPU_TARGET
    return _device_target(device)


@functools.cache
def _device_target(device: torch.device) -> Target:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return Target(Backend.CUDA, props.multi_processor_count, props.multi_processor_count, tma=props.major >= 9)
    props = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
    return Target(Backend.ASCEND, props["num_aicore"], props["num_vectorcore"])


def launch_options(backend: Backend, num_warps: int, num_stages: int | None = None) -> dict:
    """Triton launch options: triton-ascend ignores warps and stages (and warns about each launch that sets them)."""
    if backend is Backend.ASCEND:
        return {}
    return {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
