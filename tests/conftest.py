import os

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors. The variable must be
# set before any @triton.jit decorator runs, i.e. before bi_compile's kernels are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _dot_in_k_order(self, a, b, d, input_precision, max_num_imprecise_acc):
    """The interpreter's ``tl.dot`` with each output's products added in k order, whatever the tile's shape. Triton's
    own hands each tile to numpy's matmul, whose BLAS may pick its kernel, and so the order of a sum, from the tile's
    shape: on OpenBLAS's Haswell kernels (an AMD EPYC host) a row's bits then change with the tile height that its M
    selects, which a GPU's MMA never does. Same inputs, conversions and accumulator dtype as the original."""
    import numpy as np
    from triton.runtime.interpreter import _convert_float, tl

    a_data, b_data, out = a.data, b.data, d.data.dtype
    if any(t.dtype.primitive_bitwidth == 8 and t.dtype.is_floating() for t in (a, b)):
        a_data = _convert_float(a_data, a.dtype, tl.float16, None).view(np.float16)
        b_data = _convert_float(b_data, b.dtype, tl.float16, None).view(np.float16)
    a_data, b_data = a_data.astype(out), b_data.astype(out)
    total = a_data[..., :, 0:1] * b_data[..., 0:1, :]
    for k in range(1, a_data.shape[-1]):
        total = total + a_data[..., :, k : k + 1] * b_data[..., k : k + 1, :]
    return type(d)(total + d.data, d.dtype.scalar)


if os.environ.get("TRITON_INTERPRET") == "1":
    try:
        from triton.runtime import interpreter
    except ImportError:  # no triton: the tests that need it skip
        pass
    else:
        interpreter.InterpreterBuilder.create_dot = _dot_in_k_order


@pytest.fixture
def triton_device():
    """Where the Triton kernels run: the GPU, or the CPU under Triton's interpreter."""
    pytest.importorskip("triton")
    return "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run `pytest -m gpu` on the GPU machine (benchmarks/gpu_run.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
