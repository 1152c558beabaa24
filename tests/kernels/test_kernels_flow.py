"""Rectified-flow kernels: z_t, the fused objective with its gradient, and the guided Euler step."""

import pytest
import torch

from kernels import cfg_euler_step, flow_interpolate, rf_loss_per_sample
from kernels.reference import cfg_euler_step_reference, flow_interpolate_reference, rf_loss_per_sample_reference
from pretrain.losses import interpolate_flow, rectified_flow_loss
from tests.kernels.parity import assert_close, check_parity

SHAPES = [(3, 4, 5, 7), (1, 4, 33, 33)]  # odd sizes; batch of one over several blocks and splits


def _randn(*shape, seed=0, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16])
def test_flow_interpolate_matches_interpolate_flow(device, shape, out_dtype):
    x, z0 = _randn(*shape, device=device), _randn(*shape, seed=1, device=device)
    t = torch.rand(shape[0], generator=torch.Generator().manual_seed(2)).to(device)
    z_t = flow_interpolate(x, z0, t, out_dtype)
    expected = interpolate_flow(x, z0, t)[0]
    assert z_t.dtype == (out_dtype or torch.float32)
    assert_close(z_t, expected, out_dtype or torch.float32, "z_t")
    torch.testing.assert_close(z_t, flow_interpolate_reference(x, z0, t, out_dtype))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "v_dtype, data_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)],
)
def test_rf_loss_matches_reference(device, shape, v_dtype, data_dtype):
    v = _randn(*shape, dtype=v_dtype, device=device)
    x = _randn(*shape, seed=1, dtype=data_dtype, device=device)
    z0 = _randn(*shape, seed=2, dtype=data_dtype, device=device)
    # a non-uniform seed per sample checks that backward scales each sample by its own gradient
    seed = torch.arange(1, shape[0] + 1, dtype=torch.float32)
    out = check_parity(
        rf_loss_per_sample, rf_loss_per_sample_reference, [v, x, z0], [True, False, False], v_dtype, grad_out=seed
    )
    assert out.dtype == torch.float32 and out.shape == (shape[0],)


def test_rf_loss_forms_the_target_in_the_data_dtype(device):
    """With bf16 data the eager target x - z0 is rounded to bf16; the kernel rounds it the same way."""
    v = _randn(2, 3, 5, 5, device=device)
    x = _randn(2, 3, 5, 5, seed=1, dtype=torch.bfloat16, device=device)
    z0 = _randn(2, 3, 5, 5, seed=2, dtype=torch.bfloat16, device=device)
    expected = rf_loss_per_sample_reference(v, x, z0)
    torch.testing.assert_close(rf_loss_per_sample(v, x, z0), expected, rtol=1e-6, atol=0.0)


def test_rf_loss_equals_the_trainer_loss(device):
    """The fused per-sample sums equal losses.rectified_flow_loss on interpolate_flow's target."""
    x, z0, v = (_randn(2, 4, 6, 6, seed=s, device=device) for s in range(3))
    t = torch.rand(2, generator=torch.Generator().manual_seed(3)).to(device)
    v_fused = v.clone().requires_grad_()
    v_eager = v.clone().requires_grad_()
    fused_total = rf_loss_per_sample(v_fused, x, z0).sum()
    eager = rectified_flow_loss(v_eager, interpolate_flow(x, z0, t)[1])
    torch.testing.assert_close(fused_total, eager.total, rtol=1e-5, atol=1e-6)
    fused_total.backward()
    eager.total.backward()
    torch.testing.assert_close(v_fused.grad, v_eager.grad, rtol=1e-5, atol=1e-7)


def test_rf_loss_without_grad_writes_no_gradient(device):
    v, x, z0 = (_randn(2, 3, 4, seed=s, device=device) for s in range(3))
    with torch.no_grad():
        loss = rf_loss_per_sample(v, x, z0)
    torch.testing.assert_close(loss, rf_loss_per_sample_reference(v, x, z0))


@pytest.mark.parametrize("v_dtype", [torch.float32, torch.bfloat16])
def test_cfg_euler_step_matches_reference(device, v_dtype):
    z = _randn(3, 4, 5, 7, device=device)
    v = _randn(6, 4, 5, 7, seed=1, dtype=v_dtype, device=device)
    v_cond, v_uncond = v.chunk(2)  # one batched forward, cond half first
    expected = cfg_euler_step_reference(z, v_cond, v_uncond, 2.0, 0.04)
    torch.testing.assert_close(cfg_euler_step(z, v_cond, v_uncond, 2.0, 0.04), expected, rtol=1e-6, atol=1e-6)
    z_in_place = z.clone()
    returned = cfg_euler_step(z_in_place, v_cond, v_uncond, 2.0, 0.04, out=z_in_place)
    assert returned is z_in_place
    torch.testing.assert_close(z_in_place, expected, rtol=1e-6, atol=1e-6)
