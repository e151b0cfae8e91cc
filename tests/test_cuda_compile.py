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
    """Control: with no spills recorded, a variant that spills is a failure (ptxas on a PTX kernel that must spill)."""
    from tests import cuda_compile_check as check

    monkeypatch.setattr(check, "KNOWN_SPILL_STORES", {})
    ptx = _spilling_ptx()
    variant = check.Variant("spiller", {})
    check.assemble(ptx, variant)
    assert variant.spill_stores > 0 and variant.errors == [f"{variant.spill_stores} bytes of spill stores, 0 known"]
    monkeypatch.setattr(check, "KNOWN_SPILL_STORES", {variant.name(): variant.spill_stores})
    recorded = check.Variant("spiller", {})
    check.assemble(ptx, recorded)
    assert recorded.errors == []


def _spilling_ptx(values: int = 64, registers: int = 32) -> str:
    """A kernel that holds ``values`` volatile loads live at once within ``registers`` registers: it must spill."""
    loads = "\n".join(f"    ld.volatile.global.f32 %f{i}, [%rd1+{4 * i}];" for i in range(values))
    sums = "\n".join(f"    add.f32 %f{values}, %f{values}, %f{i};" for i in reversed(range(values)))
    return f"""
.version 8.0
.target sm_90a
.address_size 64
.visible .entry spiller(.param .u64 p) .maxnreg {registers}
{{
    .reg .f32 %f<{values + 1}>;
    .reg .b64 %rd<2>;
    ld.param.u64 %rd1, [p];
{loads}
    mov.f32 %f{values}, 0f00000000;
{sums}
    st.volatile.global.f32 [%rd1], %f{values};
    ret;
}}
"""
