"""Backend selection: Triton on CUDA, the reference on CPU, switchable."""

import pytest
import torch

import kernels
from kernels import dispatch, kernel_backend, rms_norm, set_kernel_backend, use_triton


@pytest.fixture(autouse=True)
def _restore_backend():
    previous = dispatch.get_kernel_backend()
    yield
    set_kernel_backend(previous)


def test_auto_uses_the_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    set_kernel_backend("auto")
    x = torch.randn(2, 3)
    assert not use_triton(x)
    out = rms_norm(x.requires_grad_(), torch.ones(3))
    assert "RMSNormFunction" not in type(out.grad_fn).__name__


def test_reference_backend_never_uses_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    set_kernel_backend("reference")
    assert not use_triton(torch.randn(2))


@pytest.mark.skipif(not dispatch.triton_available(), reason="triton is not installed")
def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    set_kernel_backend("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        use_triton(torch.randn(2))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(torch.randn(2))


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="auto"):
        set_kernel_backend("cuda")


def test_context_manager_restores_the_backend():
    set_kernel_backend("auto")
    with kernel_backend("reference"):
        assert kernels.get_kernel_backend() == "reference"
    assert kernels.get_kernel_backend() == "auto"


@pytest.mark.gpu
def test_auto_uses_triton_on_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    set_kernel_backend("auto")
    assert use_triton(torch.randn(2, device="cuda"))
