"""Compile every Triton kernel variant with the real triton-ascend front end, as far as a machine without CANN goes.

    make ascend-check          (builds .venv-ascend: triton-ascend 3.2.0, pybind11, the CPU torch; docs/ascend.md)

Runs in its own environment, because triton-ascend owns the ``triton`` module. A stand-in NPU driver reports an
Ascend910B3 target and its core counts, ``device.CPU_TARGET`` is set to that Ascend target, and the project's own
launchers run on CPU tensors, so each launch compiles the constexprs, dtypes and Ascend blockings a real NPU would.
triton-ascend lowers each kernel through its front end (TTIR) and the bundled triton-adapter-opt (linalg); the next
stage is CANN's closed bishengir-compile, which fails here with "ASCEND_HOME_PATH is not set". A variant passes
when it reaches that stage and its IR passes the lints:

- live tiles: the peak bytes of tensors live at once in the linalg IR (SSA liveness in program order, a value
  defined before a loop live to the loop's end, a result that can take a dying operand's buffer counted once,
  views free) at most 96 KB, the unified buffer a core has with double buffering on. An estimate of what
  bishengir-compile allocates, not its allocator: it catches a blocking that cannot fit, it does not prove one fits;
- no inline assembly (``tt.elementwise_inline_asm``: PTX does not run on an NPU);
- grids: the launches of a Qwen3-0.6B and a Qwen3-8B prefill of 32k tokens ask for at most 65535 programs
  (triton-ascend refuses more). Those launches are recorded, not compiled.

Prints one line per variant and ends with "N passed, N failed"; exits 1 on any failure.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="bi-ascend-cache-")
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bi_compile.kernels import attention, device, matmul, reduce, rms_norm, softmax  # noqa: E402
from tests.kernel_variants import StandInDriver, compile_variants, variant_key  # noqa: E402

UB_BYTES = 96 * 1024
MAX_GRID = 65535
CANN_STAGE = "ConvertLinalgRToBinary"


class _StandInUtils:
    def get_device_properties(self, device_index):
        return {"max_shared_mem": 1, "num_aicore": 20, "num_vectorcore": 40}  # an Ascend 910B3


@dataclass
class Launch:
    kernel: str
    grid: tuple
    constexprs: dict
    errors: list[str] = field(default_factory=list)
    live_bytes: int = 0

    def name(self) -> str:
        return f"{self.kernel}[{', '.join(f'{k}={v}' for k, v in self.constexprs.items())}]"


LAUNCHES: list[Launch] = []
COMPILE = True  # False: record the launches (grids) only
# triton-adapter-opt 3.2.0 sometimes crashes on the same input that it compiles on the next try (heap corruption in
# its Linalg conversion, seen on the fp16/bf16 grouped matmul about one run in two): a crash is compiled again, up
# to TOOL_CRASH_ATTEMPTS times, and reported; any other failure is final at once.
TOOL_CRASH = "PLEASE submit a bug report"
TOOL_CRASH_ATTEMPTS = 3


def _recording_run(self, *args, grid, warmup, **kwargs):
    launch = Launch(self.fn.__name__, tuple(grid), variant_key(self, args, kwargs))
    LAUNCHES.append(launch)
    if not COMPILE:
        return None
    for attempt in range(1, TOOL_CRASH_ATTEMPTS + 1):
        try:
            self._original_run(*args, grid=grid, warmup=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - every failure is reported with its message
            failure = e
        else:
            launch.errors.append("compiled to the end: expected CANN's stage to be missing")
            return None
        if TOOL_CRASH not in str(failure):
            break
        print(f"triton-adapter-opt crashed on {launch.name()} (attempt {attempt} of {TOOL_CRASH_ATTEMPTS})")
    message = str(failure)
    if getattr(failure, "stage_name", None) != CANN_STAGE or "ASCEND_HOME_PATH" not in message:
        launch.errors.append(f"{type(failure).__name__} before CANN's stage: {message.strip()[:2000]}")
        return None
    cache = Path(re.search(r"kernel cache is in (\S+)", message).group(1))
    ttir = (cache / f"{launch.kernel}.ttir").read_text()
    if "elementwise_inline_asm" in ttir:
        launch.errors.append("inline assembly")
    launch.live_bytes = live_tensor_bytes((cache / f"{launch.kernel}.ttadapter").read_text())
    if launch.live_bytes > UB_BYTES:
        launch.errors.append(f"live tiles {launch.live_bytes} B > {UB_BYTES} B")
    return None


# ---- live-tile estimate over linalg IR -------------------------------------------------------------------------

_ELEMENT_BYTES = {"f64": 8, "i64": 8, "index": 8, "f32": 4, "i32": 4, "f16": 2, "bf16": 2, "i16": 2, "i8": 1, "i1": 1}
_TYPE = re.compile(r"(?:tensor|memref)<([0-9x]+)x?([a-z]+[0-9]*)[,>]")
_DEF = re.compile(r"^\s*(%[\w.]+)(?::(\d+))?\s*=\s*([\w.]+)")
_VIEWS = {"tensor.empty", "tensor.expand_shape", "tensor.collapse_shape", "tensor.extract_slice", "tensor.cast",
          "memref.reinterpret_cast", "memref.subview", "memref.cast", "bufferization.to_tensor"}


def _bytes(type_text: str) -> int:
    match = _TYPE.search(type_text + ">")
    if not match or not match.group(1):
        return 0
    count = 1
    for dim in match.group(1).rstrip("x").split("x"):
        count *= int(dim)
    return count * _ELEMENT_BYTES.get(match.group(2), 4)


def _result_types(text: str) -> list[int]:
    """Byte sizes of an op's results, from the type list after its last '->' (or ':')."""
    tail = text.rsplit("->", 1)[1] if "->" in text else text.rsplit(" : ", 1)[-1]
    tail = tail.split("{")[0]
    return [_bytes(t) for t in re.findall(r"(?:tensor|memref)<[^>]*>", tail)] or [0]


def live_tensor_bytes(ir: str) -> int:
    lines = ir.splitlines()
    start, end, size = {}, {}, {}
    fills: dict[str, list[int]] = {}  # a broadcast scalar can be rematerialized: live only where it is used
    open_regions: list[tuple[int, list[str]]] = []  # (line, result names whose types the closing line gives)
    loops: list[tuple[int, int]] = []
    loop_stack: list[int] = []
    for i, line in enumerate(lines):
        text = line.strip()
        if text.startswith("}"):
            if text.endswith("{"):  # } else {
                continue
            opened, names = open_regions.pop()
            if opened in loop_stack:
                loop_stack.remove(opened)
                loops.append((opened, i))
            for name, nbytes in zip(names, _result_types(text) if "->" in text else []):
                size[name] = nbytes
            continue
        match = _DEF.match(line)
        names: list[str] = []
        if match:
            base, count, op = match.groups()
            names = [base] if count is None else [f"{base}#{k}" for k in range(int(count))]
            if op not in _VIEWS:
                for name, nbytes in zip(names, _result_types(text) if not text.endswith("{") or "->" in text else []):
                    size[name] = nbytes
                for name in names:
                    start[name] = end[name] = i
                if op == "linalg.fill":
                    fills[base] = []
        if "iter_args(" in text:  # block arguments take the loop's result types
            args = re.findall(r"(%[\w]+) = %", text.split("iter_args(", 1)[1])
            for name, nbytes in zip(args, _result_types(text)):
                start[name], end[name], size[name] = i, i, nbytes
        if text.endswith("{"):
            open_regions.append((i, [] if (not match or "->" in text and "scf.for" in text) else names))
            if "scf.for" in text:
                loop_stack.append(i)
        for used in re.findall(r"%[\w.]+(?:#\d+)?", text[match.end():] if match else text):
            if used in fills:
                fills[used].append(i)
                continue
            for name in (used, used + "#0"):
                if name in end and start[name] < i:
                    end[name] = i
        for used in re.findall(r"(%[\w.]+)#(\d+)", text):
            name = f"{used[0]}#{used[1]}"
            if name in end:
                end[name] = i
    for opened, closed in loops:  # a value from before a loop and used in it stays live through the loop
        for name in end:
            if start[name] < opened < end[name] <= closed:
                end[name] = closed
    pressure = [0] * (len(lines) + 2)
    for name, uses in fills.items():
        for i in set(uses):
            pressure[i] += size.get(name, 0)
    for name, first in start.items():
        if name in fills:
            continue
        nbytes = size.get(name, 0)
        # A result may take the buffer of an operand that dies on its line.
        if any(end[other] == first and start[other] < first and size.get(other, 0) >= nbytes for other in end):
            first += 1
        for i in range(first, end[name] + 1):
            pressure[i] += nbytes
    return max(pressure)


# ---- the variants --------------------------------------------------------------------------------------------

QWEN3 = {  # hidden, heads, kv heads, head dim, intermediate
    "Qwen3-0.6B": (1024, 16, 8, 128, 3072),
    "Qwen3-8B": (4096, 32, 8, 128, 12288),
}
PREFILL_TOKENS = 32768


def record_prefill_launches() -> None:
    """One layer's launches for a 32k-token prefill (torch.empty: the pages are never touched)."""
    for model, (hidden, heads, kv_heads, head_dim, inter) in QWEN3.items():
        x = torch.empty(PREFILL_TOKENS, hidden, dtype=torch.bfloat16)
        rms_norm.rms_norm(x, torch.empty(hidden, dtype=torch.bfloat16), 1e-6)
        rms_norm.add_rms_norm(x, x, torch.empty(hidden, dtype=torch.bfloat16), 1e-6)
        rms_norm.layer_norm(x, torch.empty(hidden, dtype=torch.bfloat16), torch.empty(hidden, dtype=torch.bfloat16),
                            1e-5)
        for n in ((heads + 2 * kv_heads) * head_dim, hidden, 2 * inter):
            matmul.matmul(x[None], torch.empty(n, hidden, dtype=torch.bfloat16).t()[None])
        matmul.matmul(torch.empty(1, PREFILL_TOKENS, inter, dtype=torch.bfloat16),
                      torch.empty(hidden, inter, dtype=torch.bfloat16).t()[None])
        q_norm_rows = torch.empty(PREFILL_TOKENS * heads, head_dim, dtype=torch.bfloat16)  # per-head q/k RMSNorm
        rms_norm.rms_norm(q_norm_rows, torch.empty(head_dim, dtype=torch.bfloat16), 1e-6)
        reduce.row_sum(q_norm_rows, torch.float32, mean=True, square=True)
        q = torch.empty(1, heads, PREFILL_TOKENS, head_dim, dtype=torch.bfloat16)
        kv = torch.empty(1, kv_heads, PREFILL_TOKENS, head_dim, dtype=torch.bfloat16)
        attention.attention(q, kv, kv, None, True, 0.1)
        softmax.softmax(torch.empty(PREFILL_TOKENS, 151936 // 64, dtype=torch.bfloat16), torch.float32)
        reduce.row_sum(x.view(-1), torch.float32)  # x.sum(): one row of 32k x hidden, cut into pieces


def main() -> int:
    global COMPILE
    driver.set_active(StandInDriver(GPUTarget("npu", "Ascend910B3", 0), _StandInUtils()))
    device.CPU_TARGET = device.Target(device.Backend.ASCEND, cube_cores=20, vector_cores=40)
    JITFunction._original_run = JITFunction.run
    JITFunction.run = _recording_run
    began = time.perf_counter()
    compile_variants()
    seconds = time.perf_counter() - began
    compiled = list(LAUNCHES)
    COMPILE = False
    LAUNCHES.clear()
    record_prefill_launches()
    variants: dict[str, Launch] = {}
    for launch in compiled:
        variants.setdefault(launch.name(), launch)
    for launch in LAUNCHES:
        programs = 1
        for size in launch.grid:
            programs *= size
        if programs > MAX_GRID:
            launch.errors.append(f"grid {launch.grid} at {PREFILL_TOKENS} tokens: {programs} programs > {MAX_GRID}")
            variants[f"prefill {launch.name()}"] = launch
    failed = 0
    for name, launch in variants.items():
        failed += bool(launch.errors)
        status = "FAIL" if launch.errors else "ok"
        print(f"{status:4} {launch.live_bytes / 1024:6.1f} KB  {name}")
        for error in launch.errors:
            print(f"       {error}")
    print(f"{len(variants)} variants compiled to CANN's stage in {seconds:.1f} s (triton-ascend {triton.__version__})")
    print(f"{len(variants) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
