"""Every Triton kernel variant compiles for a Hopper GPU (sm_90a) without one, within its recorded spills
(tests/cuda_compile_check.py). Its own process: the check turns the interpreter off and swaps Triton's driver."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia")
CHECK = Path(__file__).with_name("cuda_compile_check.py")


def _run_check() -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest's, for the other tests
    return subprocess.run([sys.executable, str(CHECK)], capture_output=True, text=True, timeout=1200, env=env)


@pytest.mark.slow  # about 3 minutes on the 2-core CI machine
def test_every_kernel_variant_compiles_for_sm90_within_its_recorded_spills():
    done = _run_check()
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " 0 failed" in done.stdout


def test_the_check_fails_a_variant_that_spills_more_than_recorded(monkeypatch):
    """Control: with no spills recorded, a variant that spills is a failure (ptxas on a PTX kernel that must spill),
    by both measures when it spills inside a loop; with its spills recorded, it passes."""
    from tests import cuda_compile_check as check

    for in_loop in (False, True):
        monkeypatch.setattr(check, "KNOWN_SPILLS", {measure: {} for measure in check.MEASURES})
        ptx = _spilling_ptx(in_loop)
        variant = check.Variant("spiller", {})
        check.assemble(ptx, variant)
        assert variant.spill_stores > 0 and (variant.loop_local_accesses > 0) == in_loop, variant
        want = [f"{variant.spill_stores} bytes of spill stores, 0 known"]
        if in_loop:
            want.append(f"{variant.loop_local_accesses} local-memory accesses in innermost loops, 0 known")
        assert variant.errors == want
        monkeypatch.setattr(check, "KNOWN_SPILLS", {measure: {variant.name(): getattr(variant, measure)}
                                                    for measure in check.MEASURES})
        recorded = check.Variant("spiller", {})
        check.assemble(ptx, recorded)
        assert recorded.errors == []


def _spilling_ptx(in_loop: bool, values: int = 64, registers: int = 32) -> str:
    """A kernel that holds ``values`` volatile loads live at once within ``registers`` registers, so it must spill;
    with ``in_loop``, it does that on every pass of a loop with a run-time trip count."""
    loads = "\n".join(f"    ld.volatile.global.f32 %f{i}, [%rd1+{4 * i}];" for i in range(values))
    sums = "\n".join(f"    add.f32 %f{values}, %f{values}, %f{i};" for i in reversed(range(values)))
    loop_head = "    ld.param.u32 %r1, [n];\nLOOP:" if in_loop else ""
    loop_tail = "    sub.s32 %r1, %r1, 1;\n    setp.ne.s32 %p1, %r1, 0;\n    @%p1 bra LOOP;" if in_loop else ""
    return f"""
.version 8.0
.target sm_90a
.address_size 64
.visible .entry spiller(.param .u64 p, .param .u32 n) .maxnreg {registers}
{{
    .reg .f32 %f<{values + 1}>;
    .reg .b64 %rd<2>;
    .reg .b32 %r<2>;
    .reg .pred %p<2>;
    ld.param.u64 %rd1, [p];
{loop_head}
{loads}
    mov.f32 %f{values}, 0f00000000;
{sums}
    st.volatile.global.f32 [%rd1], %f{values};
{loop_tail}
    ret;
}}
"""
