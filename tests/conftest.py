import os

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors. The variable must be
# set before any @triton.jit decorator runs, i.e. before bi_compile's kernels are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
