"""Kernel parity tests: the Triton path against the PyTorch reference.

On CPU the kernels run in Triton's interpreter. ``TRITON_INTERPRET=1`` is set per test (the
``device`` fixture), not at import: ``fused_kernels._triton`` picks compiled or interpreted at each launch,
so it does not matter that the rest of the suite may import triton and ``kernels`` first, and the
variable does not leak into other tests. With a GPU the same tests also run compiled on CUDA.
"""

import pytest
import torch

from fused_kernels import kernel_backend
from fused_kernels._triton import HAVE_TRITON

# The CUDA cases carry the ``gpu`` mark: ``pytest -m gpu`` (the GPU check) runs the compiled kernels
# against their references, and they skip with one reason where there is no GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    """The device to test on, with the backend forced to Triton (interpreted on CPU)."""
    if not HAVE_TRITON:
        pytest.skip("triton is not installed")
    if request.param == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with kernel_backend("triton"):
        yield torch.device(request.param)


@pytest.fixture(params=["triton", "reference"])
def impl(request, device):
    """Which implementation runs on ``device``: the Triton kernel or its PyTorch reference (both are
    held to the paper's formula, ``tests.fused_kernels.formulas``)."""
    with kernel_backend(request.param):
        yield request.param
