"""Compile every Triton kernel variant for a Hopper GPU (sm_90a) on a machine without one, and read ptxas's report.

    .venv/bin/python tests/cuda_compile_check.py      (tests/test_cuda_compile.py runs it in CI)

The Triton interpreter, which runs the CPU tests, accepts kernels that Triton's NVIDIA backend rejects, and says
nothing of registers. Here a stand-in driver reports an sm_90 target, ``device.CPU_TARGET`` is set to an H100/H200
(132 SMs, TMA), and the project's own launchers run on CPU tensors (tests/kernel_variants.py), so each launch
compiles the constexprs, dtypes and CUDA blockings a GPU would, through Triton's full pipeline to PTX. ptxas from the
Triton wheel then assembles each PTX for sm_90a with ``-v``, and its nvdisasm lists the machine code. A variant fails
when it does not compile, or when it spills more than tests/cuda_spill_stores.json records for it (none where it
records nothing), by either measure: the spill stores ptxas reports, and the local-memory accesses (STL/LDL) inside
its innermost loops, the ones each chunk or tile of the kernel's work repeats. A blocking that spills more is a
slower one, so a change that adds spills fails here, on CPU, before a GPU times it. ``--record`` rewrites the file
from this run (after a change that removes spills, or a new Triton). Nothing runs, so nothing here says anything of
speed or bits: those need the GPU (benchmarks/gpu_run.sh).

Prints one line per variant (registers, spill stores and loads, local accesses in innermost loops) and ends with
"N passed, N failed"; exits 1 on any failure.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bi_compile.kernels import device  # noqa: E402
from tests.kernel_variants import StandInDriver, compile_variants, variant_key  # noqa: E402

ARCH = "sm_90a"
HOPPER = device.Target(device.Backend.CUDA, cube_cores=132, vector_cores=132, tma=True)
# Per measure, the variants' spills as last recorded (``--record`` rewrites it): a variant may spill no more than
# its entry, one with no entry not at all.
KNOWN_SPILLS_FILE = Path(__file__).with_name("cuda_spill_stores.json")
KNOWN_SPILLS: dict[str, dict[str, int]] = json.loads(KNOWN_SPILLS_FILE.read_text())
# The measures, as the file names them and as an error says them.
MEASURES = {"spill_stores": "bytes of spill stores", "loop_local_accesses": "local-memory accesses in innermost loops"}
NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
PTXAS, NVDISASM = NVIDIA_BIN / "ptxas", NVIDIA_BIN / "nvdisasm"
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
# nvdisasm -c: a label line, and an instruction line "/*0a30*/  @P0 BRA `(.L_x_12) ;"
_SASS_LABEL = re.compile(r"\.L_x_(\d+):")
_SASS_INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_SASS_BRANCH = re.compile(r"\bBRA\b.*`\(\.L_x_(\d+)\)")
_SASS_LOCAL_ACCESS = re.compile(r"(@!?U?P\w+\s+)?(STL|LDL)\b")


@dataclass
class Variant:
    kernel: str
    constexprs: dict
    errors: list[str] = field(default_factory=list)
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    loop_local_accesses: int = 0

    def name(self) -> str:
        return f"{self.kernel}[{', '.join(f'{k}={v}' for k, v in self.constexprs.items())}]"


VARIANTS: dict[str, Variant] = {}


def assemble(ptx: str, variant: Variant) -> None:
    """ptxas -v on the variant's PTX: its registers and spills per thread; then the local-memory accesses inside
    its innermost loops, in nvdisasm's listing of the machine code."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        cubin = source.with_suffix(".cubin")
        done = subprocess.run([str(PTXAS), f"-arch={ARCH}", "-v", str(source), "-o", str(cubin)],
                              capture_output=True, text=True)
        if done.returncode:
            variant.errors.append(f"ptxas: {done.stderr.strip()[-2000:]}")
            return
        sass = subprocess.run([str(NVDISASM), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    spills, registers = _PTXAS_SPILLS.search(done.stderr), _PTXAS_REGISTERS.search(done.stderr)
    variant.spill_stores, variant.spill_loads = int(spills[1]), int(spills[2])
    variant.registers = int(registers[1])
    variant.loop_local_accesses = innermost_loop_local_accesses(sass)
    for measure, what in MEASURES.items():
        value, allowed = getattr(variant, measure), KNOWN_SPILLS[measure].get(variant.name(), 0)
        if value > allowed:
            variant.errors.append(f"{value} {what}, {allowed} known")


def innermost_loop_local_accesses(sass: str) -> int:
    """STL/LDL instructions inside the innermost loops of an nvdisasm listing: a loop runs from a label to a branch
    back to it, and an innermost one holds no other."""
    labels, instructions, pending = {}, [], []
    for line in sass.splitlines():
        if label := _SASS_LABEL.match(line.strip()):
            pending.append(label[1])
        elif instruction := _SASS_INSTRUCTION.match(line):
            address = int(instruction[1], 16)
            labels.update(dict.fromkeys(pending, address))
            pending = []
            instructions.append((address, instruction[2]))
    loops = [(labels[branch[1]], address) for address, text in instructions
             if (branch := _SASS_BRANCH.search(text)) and labels.get(branch[1], address) < address]
    innermost = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    return sum(1 for address, text in instructions
               if _SASS_LOCAL_ACCESS.match(text) and any(a <= address <= b for a, b in innermost))


def _compiling_run(self, *args, grid, warmup, **kwargs):
    variant = Variant(self.fn.__name__, variant_key(self, args, kwargs, ("num_warps", "num_stages")))
    if variant.name() in VARIANTS:
        return None
    VARIANTS[variant.name()] = variant
    try:
        kernel = self._original_run(*args, grid=grid, warmup=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - every failure is reported with its message
        variant.errors.append(f"{type(e).__name__}: {str(e).strip()[:2000]}")
        return None
    assemble(kernel.asm["ptx"], variant)
    return None


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels were made interpreted functions at import
        sys.exit("cuda_compile_check: run it without TRITON_INTERPRET=1 (it compiles; the interpreter runs)")
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="bi-cuda-cache-")
    driver.set_active(StandInDriver(GPUTarget("cuda", 90, 32)))
    device.CPU_TARGET = HOPPER
    JITFunction._original_run = JITFunction.run
    JITFunction.run = _compiling_run
    began = time.perf_counter()
    compile_variants()
    seconds = time.perf_counter() - began
    failed = 0
    for name, variant in VARIANTS.items():
        failed += bool(variant.errors)
        status = "FAIL" if variant.errors else "ok"
        print(f"{status:4} {variant.registers:3} regs {variant.spill_stores:5} B spilled {variant.spill_loads:5} B "
              f"reloaded {variant.loop_local_accesses:4} in loops  {name}")
        for error in variant.errors:
            print(f"       {error}")
    print(f"{len(VARIANTS)} variants compiled for {ARCH} in {seconds:.1f} s (triton {triton.__version__}, "
          f"torch {torch.__version__})")
    print(f"{len(VARIANTS) - failed} passed, {failed} failed")
    if "--record" in sys.argv[1:]:
        spills = {measure: {name: getattr(v, measure) for name, v in VARIANTS.items() if getattr(v, measure)}
                  for measure in MEASURES}
        KNOWN_SPILLS_FILE.write_text(json.dumps(spills, indent=1) + "\n")
        print(f"recorded the spills of {len(set().union(*spills.values()))} variants in {KNOWN_SPILLS_FILE}")
        return 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
