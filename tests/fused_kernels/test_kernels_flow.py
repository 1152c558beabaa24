"""Rectified-flow ops (z_t, the objective with its gradient, the guided Euler step): the Triton kernel
and the PyTorch reference, each against the paper's formula (``tests.fused_kernels.formulas``)."""

import pytest
import torch

from fused_kernels import cfg_euler_step, flow_interpolate, rf_loss_per_sample
from fused_kernels.reference import rf_loss_per_sample_reference
from tests.fused_kernels import formulas
from tests.fused_kernels.parity import assert_near, check_against_formula

SHAPES = [(3, 4, 5, 7), (1, 4, 33, 33)]  # odd sizes; batch of one over several blocks and splits


def _randn(*shape, seed=0, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16])
def test_flow_interpolate_is_eq3(device, impl, shape, out_dtype):
    x, z0 = _randn(*shape, device=device), _randn(*shape, seed=1, device=device)
    t = torch.rand(shape[0], generator=torch.Generator().manual_seed(2)).to(device)
    t[0] = 0.0  # the ends are exact: noise at t = 0, data at t = 1
    if shape[0] > 1:
        t[1] = 1.0
    check_against_formula(lambda *a: flow_interpolate(*a, out_dtype), formulas.flow_point, [x, z0, t],
                          [False] * 3, out_dtype or torch.float32)
    z_t = flow_interpolate(x, z0, t, out_dtype)
    assert z_t.dtype == (out_dtype or torch.float32)
    if out_dtype is None:  # (Triton's interpreter truncates in a cast to bf16: exact ends in float32 only)
        assert torch.equal(z_t[0], z0[0])
        assert shape[0] == 1 or torch.equal(z_t[1], x[1])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "v_dtype, data_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)],
)
def test_rf_loss_is_eq7(device, impl, shape, v_dtype, data_dtype):
    v = _randn(*shape, dtype=v_dtype, device=device)
    x = _randn(*shape, seed=1, dtype=data_dtype, device=device)
    z0 = _randn(*shape, seed=2, dtype=data_dtype, device=device)
    # a non-uniform seed per sample checks that backward scales each sample by its own gradient
    seed = torch.arange(1, shape[0] + 1, dtype=torch.float32)
    coarsest = torch.bfloat16 if torch.bfloat16 in (v_dtype, data_dtype) else torch.float32
    out = check_against_formula(rf_loss_per_sample, formulas.rf_loss_per_sample, [v, x, z0], [True, False, False],
                                coarsest, grad_out=seed)
    assert out.dtype == torch.float32 and out.shape == (shape[0],)


def test_rf_loss_target_is_a_constant(device, impl):
    """x and z0 get no gradient (the formula's target is detached too; check_against_formula asks for
    theirs and would fail on a gradient of another dtype or a missing one, so ask directly)."""
    v = _randn(2, 3, 4, 4, device=device).requires_grad_()
    x = _randn(2, 3, 4, 4, seed=1, device=device).requires_grad_()
    z0 = _randn(2, 3, 4, 4, seed=2, device=device).requires_grad_()
    rf_loss_per_sample(v, x, z0).sum().backward()
    assert v.grad is not None and x.grad is None and z0.grad is None


def test_rf_loss_forms_the_target_in_the_data_dtype(device):
    """With bf16 data the eager target x - z0 is rounded to bf16; the kernel rounds it the same way
    (bit-for-bit in the per-sample sums: measured 0 difference on CPU)."""
    v = _randn(2, 3, 5, 5, device=device)
    x = _randn(2, 3, 5, 5, seed=1, dtype=torch.bfloat16, device=device)
    z0 = _randn(2, 3, 5, 5, seed=2, dtype=torch.bfloat16, device=device)
    expected = rf_loss_per_sample_reference(v, x, z0)
    torch.testing.assert_close(rf_loss_per_sample(v, x, z0), expected, rtol=1e-6, atol=0.0)


def test_rf_loss_without_grad_writes_no_gradient(device, impl):
    v, x, z0 = (_randn(2, 3, 4, seed=s, device=device) for s in range(3))
    with torch.no_grad():
        loss = rf_loss_per_sample(v, x, z0)
    assert_near(loss, formulas.rf_loss_per_sample(v, x, z0), 1e-6, "L_RF without grad")


@pytest.mark.parametrize("v_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w", [1.0, 2.0, 5.0])
def test_cfg_euler_step_is_eq4_with_eq5(device, impl, v_dtype, w):
    z = _randn(3, 4, 5, 7, device=device)
    v = _randn(6, 4, 5, 7, seed=1, dtype=v_dtype, device=device)
    v_cond, v_uncond = v.chunk(2)  # one batched forward, cond half first
    # float32 math on exact (upcast) velocities: the float32 tolerance whatever their dtype (measured 4.4e-8)
    out = check_against_formula(lambda *a: cfg_euler_step(*a, w, 0.04),
                                lambda *a: formulas.guided_euler_step(*a, w, 0.04),
                                [z, v_cond, v_uncond], [False] * 3, torch.float32)
    z_in_place = z.clone()
    returned = cfg_euler_step(z_in_place, v_cond, v_uncond, w, 0.04, out=z_in_place)
    assert returned is z_in_place and torch.equal(z_in_place, out)


@pytest.mark.parametrize("wants", [(True, False, False), (False, True, False), (False, False, True)])
def test_flow_interpolate_keeps_the_gradient_of_each_input(device, wants):
    """The kernel has no backward: an input that requires grad must still get its gradient (the op
    takes the differentiable reference then), never a silent None."""
    x, z0 = _randn(2, 3, 5, device=device), _randn(2, 3, 5, seed=1, device=device)
    t = torch.rand(2, generator=torch.Generator().manual_seed(2)).to(device)
    check_against_formula(flow_interpolate, formulas.flow_point, [x, z0, t], list(wants), torch.float32)
