"""REPA's cosine loss: the Triton kernel and the PyTorch reference, each against Eq. 8 of the paper
(``tests.fused_kernels.formulas``); the eps branch of a zero row against the reference (F.normalize's)."""

import pytest
import torch

from fused_kernels import repa_cosine, repa_loss_per_sample
from fused_kernels.reference import repa_cosine_reference
from tests.fused_kernels import formulas
from tests.fused_kernels.parity import check_against_formula


def _randn(*shape, seed=0, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 37), (1, 3, 1100)])
def test_repa_cosine_is_eq8_sim(device, impl, dtype, shape):
    p = _randn(*shape, dtype=dtype, device=device)
    f = _randn(*shape, seed=1, dtype=dtype, device=device)
    # the cosine is float32 from (exact) inputs: its tolerance is float32's; its gradient is in p's dtype
    out = check_against_formula(repa_cosine, formulas.cosine, [p, f], [True, False], dtype)
    assert out.dtype == torch.float32 and out.shape == shape[:2]


def test_repa_cosine_zero_row_takes_the_eps_branch(device):
    """|p| = 0: F.normalize divides by eps instead, cos = 0 and the gradient is f_hat / eps, no NaN.
    Checked apart: those gradients are ~1e12 and would swamp a tolerance scaled by the largest value."""
    p = _randn(2, 3, 8, device=device)
    p[1, 2] = 0
    f = _randn(2, 3, 8, seed=1, device=device)
    p_fused, p_ref = p.clone().requires_grad_(), p.clone().requires_grad_()
    cos = repa_cosine(p_fused, f)
    cos_ref = repa_cosine_reference(p_ref, f)
    assert cos[1, 2] == 0
    torch.testing.assert_close(cos, cos_ref, rtol=1e-5, atol=1e-6)
    seed = torch.randn(2, 3, generator=torch.Generator().manual_seed(2)).to(device)
    cos.backward(seed)
    cos_ref.backward(seed)
    assert torch.isfinite(p_fused.grad).all()
    torch.testing.assert_close(p_fused.grad[1, 2], p_ref.grad[1, 2], rtol=1e-5, atol=0.0)
    torch.testing.assert_close(p_fused.grad[0], p_ref.grad[0], rtol=1e-5, atol=1e-6)


def test_repa_loss_is_eq8_and_stops_the_target_gradient(device, impl):
    p = _randn(3, 4, 16, device=device)
    f = _randn(3, 4, 16, seed=1, device=device)
    seed = torch.tensor([1.0, -2.0, 0.5])
    check_against_formula(repa_loss_per_sample, formulas.repa_loss_per_sample, [p, f], [True, False],
                          torch.float32, grad_out=seed)
    p_leaf, f_leaf = p.clone().requires_grad_(), f.clone().requires_grad_()
    repa_loss_per_sample(p_leaf, f_leaf).sum().backward()
    assert p_leaf.grad is not None and f_leaf.grad is None


def test_repa_cosine_nan_input_stays_nan(device, impl):
    """A NaN in a row of ``p`` or of the target makes that row's cosine and all of its gradient NaN,
    as in F.normalize (clamp_min keeps NaN); it must not be turned into finite values (a max that
    drops NaN would give |x| = eps there and gradients of ~1e11 next to the NaN)."""
    p = _randn(1, 3, 6, device=device)
    f = _randn(1, 3, 6, seed=1, device=device)
    p[0, 0, 2] = float("nan")
    f[0, 1, 4] = float("nan")
    leaf = p.clone().requires_grad_()
    cos = repa_cosine(leaf, f)
    cos.sum().backward()
    assert cos[0, :2].isnan().all() and cos[0, 2].isfinite()
    assert leaf.grad[0, :2].isnan().all(), leaf.grad[0, :2]
    assert leaf.grad[0, 2].isfinite().all()
