"""The residual add + time-conditioned scale/shift: the Triton kernel and the PyTorch reference, each
against the formula (``tests.fused_kernels.formulas``)."""

import pytest
import torch

from fused_kernels import modulate
from tests.fused_kernels import formulas
from tests.fused_kernels.parity import check_against_formula


def _randn(*shape, seed=0, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 37, 3, 5), (1, 3, 12, 13), (1, 5, 1, 1)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_modulate_is_the_formula(device, impl, dtype, shape, with_residual):
    batch, n_ch, height, width = shape
    x = _randn(*shape, dtype=dtype, device=device)
    # scale and shift as the block makes them: the two halves of one [B, 2C] projection (strided views)
    cond = _randn(batch, 2 * n_ch, seed=1, dtype=dtype, device=device)
    # the MLP branch is channels-last [B, H, W, C], added through a permuted view
    h = _randn(batch, height, width, n_ch, seed=2, dtype=dtype, device=device)

    def fused(x, cond, h):
        scale, shift = cond.chunk(2, dim=1)
        return modulate(x, scale, shift, h.permute(0, 3, 1, 2) if with_residual else None)

    def ref(x, cond, h):
        scale, shift = cond.chunk(2, dim=1)
        return formulas.modulate(x, scale, shift, h.permute(0, 3, 1, 2) if with_residual else None)

    out = check_against_formula(fused, ref, [x, cond, h], [True, True, with_residual], dtype)
    assert out.dtype == dtype and (impl == "reference" or out.is_contiguous())  # the kernel writes contiguous


def test_modulate_gradient_reaches_both_addends_without_aliasing(device):
    """x and the residual get the same gradient; accumulating into one must not change the other."""
    x = _randn(1, 4, 2, 3, device=device).requires_grad_()
    r = _randn(1, 4, 2, 3, seed=1, device=device).requires_grad_()
    scale = _randn(1, 4, seed=2, device=device)
    shift = _randn(1, 4, seed=3, device=device)
    out = modulate(x, scale, shift, r) + x  # x also reaches the loss directly
    out.sum().backward()
    expected = (1 + scale)[:, :, None, None].expand_as(x)
    torch.testing.assert_close(r.grad, expected)
    torch.testing.assert_close(x.grad, expected + 1)
