"""Backend selection: Triton on CUDA, the reference on CPU, switchable; per op on CUDA, the kernel or
the compiled reference (``dispatch.CUDA_CHOICE``); every op and its call site take the chosen path."""

from types import SimpleNamespace

import pytest
import torch

import fused_kernels
from fused_kernels import dispatch, kernel_backend, reference, rms_norm, set_kernel_backend, use_triton
from pretrain import losses
from tests.fused_kernels.parity import record_launches


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
    with pytest.raises(RuntimeError, match="train.kernels=triton.*TRITON_INTERPRET"):  # names the setting
        use_triton(torch.randn(2))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(torch.randn(2))


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="auto"):
        set_kernel_backend("cuda")


def test_context_manager_restores_the_backend():
    set_kernel_backend("auto")
    with kernel_backend("reference"):
        assert fused_kernels.get_kernel_backend() == "reference"
    assert fused_kernels.get_kernel_backend() == "auto"


@pytest.mark.gpu
def test_auto_uses_triton_on_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    set_kernel_backend("auto")
    assert use_triton(torch.randn(2, device="cuda"))


# --- per-op choice: Triton kernel, compiled reference, or reference -------------------------------


def _fake_cuda_tensor():
    """What kernel_impl reads of a tensor (is_cuda, device), for routing CUDA tensors on a CPU machine."""
    return SimpleNamespace(is_cuda=True, device=torch.device("cuda"))


def _r(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# op name -> (call on CPU tensors, its reference, the Triton kernels its forward launches)
OPS = {
    "rms_norm": (lambda: fused_kernels.rms_norm(_r(2, 3, 8), 1 + _r(8, seed=1)), reference.rms_norm_reference,
                 {"_rms_norm_fwd_kernel"}),
    "grn": (lambda: fused_kernels.grn(_r(2, 3, 3, 8), _r(1, 1, 1, 8, seed=1), _r(1, 1, 1, 8, seed=2)),
            reference.grn_reference, {"_grn_reduce_kernel", "_grn_stats_fwd_kernel", "_grn_apply_kernel"}),
    "modulate": (lambda: fused_kernels.modulate(_r(2, 4, 3, 3), _r(2, 4, seed=1), _r(2, 4, seed=2)),
                 reference.modulate_reference, {"_modulate_fwd_kernel"}),
    "flow_interpolate": (lambda: losses.interpolate_flow(_r(2, 4, 3, 3), _r(2, 4, 3, 3, seed=1), torch.rand(2)),
                         reference.flow_interpolate_reference, {"_interpolate_kernel"}),
    "rf_loss": (lambda: losses.rectified_flow_loss(_r(2, 4, 3, 3), _r(2, 4, 3, 3, seed=1), _r(2, 4, 3, 3, seed=2)),
                reference.rf_loss_per_sample_reference, {"_rf_loss_fwd_kernel"}),
    "repa_cosine": (lambda: losses.repa_loss(_r(2, 5, 16), _r(2, 5, 16, seed=1)), reference.repa_cosine_reference,
                    {"_cosine_fwd_kernel"}),
    "cfg_euler_step": (lambda: fused_kernels.cfg_euler_step(_r(2, 4, 3, 3), _r(2, 4, 3, 3, seed=1), _r(2, 4, 3, 3, seed=2),
                                                      2.0, 0.1), reference.cfg_euler_step_reference,
                       {"_cfg_euler_kernel"}),
}


def test_every_dispatched_op_has_a_routing_case():
    assert set(OPS) == set(dispatch.CUDA_CHOICE)
    assert set(dispatch.CUDA_CHOICE.values()) <= {"triton", "compile"}


@pytest.mark.parametrize("op", sorted(OPS))
def test_auto_on_cuda_takes_the_per_op_choice(monkeypatch, op):
    if not dispatch.triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    set_kernel_backend("auto")
    monkeypatch.setitem(dispatch.CUDA_CHOICE, op, "triton")
    assert dispatch.kernel_impl(op, _fake_cuda_tensor()) == "triton"
    monkeypatch.setitem(dispatch.CUDA_CHOICE, op, "compile")  # the one-line switch
    assert dispatch.kernel_impl(op, _fake_cuda_tensor()) == "compile"
    assert dispatch.kernel_impl(op, torch.zeros(1)) == "reference"  # CPU: never compiled
    set_kernel_backend("triton")
    assert dispatch.kernel_impl(op, _fake_cuda_tensor()) == "triton"  # forced: the kernel, whatever the choice
    set_kernel_backend("reference")
    assert dispatch.kernel_impl(op, _fake_cuda_tensor()) == "reference"


def test_an_unknown_op_or_choice_is_rejected(monkeypatch):
    with pytest.raises(KeyError, match="no_such_op"):
        dispatch.kernel_impl("no_such_op", torch.zeros(1))
    monkeypatch.setitem(dispatch.CUDA_CHOICE, "grn", "cuda")
    with pytest.raises(KeyError, match="'grn'"):
        dispatch.kernel_impl("grn", torch.zeros(1))


@pytest.fixture
def launches(monkeypatch):
    return record_launches(monkeypatch)


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("impl", ["triton", "compile", "reference"])
def test_each_op_and_its_call_site_take_the_chosen_path(monkeypatch, launches, op, impl):
    """Through the public op or its call site in ``pretrain.losses``: the chosen implementation runs
    (the compiled one through torch.compile of the op's own reference, built once)."""
    if impl == "triton":
        if not dispatch.triton_available():
            pytest.skip("triton is not installed")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    call, ref, kernel_names = OPS[op]
    compiled_from: list = []

    def fake_compile(fn):
        compiled_from.append(fn)
        return fn

    monkeypatch.setattr(dispatch.torch, "compile", fake_compile)
    monkeypatch.setattr(dispatch, "_COMPILED", {})
    monkeypatch.setattr(dispatch, "kernel_impl", lambda name, tensor: impl if name == op else "reference")
    call()
    call()
    if impl == "triton":
        assert kernel_names <= set(launches), launches
    else:
        assert launches == []
    assert compiled_from == ([ref] if impl == "compile" else [])


@pytest.mark.skipif(not dispatch.triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("op", ["rms_norm", "grn", "modulate", "rf_loss", "repa_cosine"])
def test_double_backward_through_a_kernel_is_refused(monkeypatch, op):
    """The kernels' backward builds no graph: ``create_graph=True`` must not hand back a gradient that
    silently drops its own derivative (a gradient penalty would train on a wrong value); it raises,
    naming the reference backend."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    set_kernel_backend("triton")
    call = {
        "rms_norm": lambda a: fused_kernels.rms_norm(a, 1 + _r(4, seed=1)),
        "grn": lambda a: fused_kernels.grn(a.reshape(1, 2, 1, 4), _r(1, 1, 1, 4, seed=1), _r(1, 1, 1, 4, seed=2)),
        "modulate": lambda a: fused_kernels.modulate(a.reshape(1, 2, 2, 2), _r(1, 2, seed=1), _r(1, 2, seed=2)),
        "rf_loss": lambda a: fused_kernels.rf_loss_per_sample(a, _r(2, 4, seed=1), _r(2, 4, seed=2)),
        "repa_cosine": lambda a: fused_kernels.repa_cosine(a.reshape(1, 2, 4), _r(1, 2, 4, seed=1)),
    }[op]
    a = _r(2, 4).requires_grad_()
    with pytest.raises(RuntimeError, match="create_graph.*'reference'"):
        torch.autograd.grad(call(a).square().sum(), a, create_graph=True)
    (grad,) = torch.autograd.grad(call(a).square().sum(), a)  # first order is unaffected
    assert grad.isfinite().all()
