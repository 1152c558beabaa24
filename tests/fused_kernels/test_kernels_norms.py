"""RMSNorm and GRN: the Triton kernels and the PyTorch references, each against the papers' formulas
(``tests.fused_kernels.formulas``); the drop-in modules' state-dict layout."""

import pytest
import torch

from fused_kernels import grn, rms_norm
from fused_kernels.reference import grn_reference, rms_norm_reference
from pretrain.model.gen_vision import GlobalResponseNorm, RMSNorm
from tests.fused_kernels import formulas
from tests.fused_kernels.parity import check_against_formula, check_parity

DTYPES = [torch.float32, torch.bfloat16]
EPS = 1e-6


def _randn(*shape, seed=0, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


# --- RMSNorm ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape, permuted",
    [
        ((2, 37, 3, 5), True),  # the block's dwconv(x).permute(0, 2, 3, 1): strided, odd sizes
        ((1, 7, 37), False),  # batch of one, rows not a multiple of the row block
        ((1, 1, 1, 130), False),  # a single row wider than 128 columns
    ],
)
def test_rms_norm_is_the_formula(device, impl, dtype, shape, permuted):
    x = _randn(*shape, dtype=dtype, device=device)
    weight = (1 + 0.5 * _randn(shape[1] if permuted else shape[-1], seed=1)).to(device, dtype)
    view = (lambda t: t.permute(0, 2, 3, 1)) if permuted else (lambda t: t)
    out = check_against_formula(
        lambda t, w: rms_norm(view(t), w, EPS),
        lambda t, w: formulas.rms_norm(view(t), w, EPS),
        [x, weight], [True, True], dtype,
    )
    assert out.dtype == dtype and (impl == "reference" or out.is_contiguous())  # the kernel writes contiguous


def test_rms_norm_fp32_weight_bf16_input(device, impl):
    x = _randn(3, 4, 24, dtype=torch.bfloat16, device=device)
    weight = _randn(24, seed=1, device=device)
    out = check_against_formula(
        lambda t, w: rms_norm(t, w, EPS), lambda t, w: formulas.rms_norm(t, w, EPS),
        [x, weight], [True, True], torch.bfloat16,
    )
    assert out.dtype == torch.bfloat16


def test_rms_norm_on_the_model_modules_weight_equals_the_module(device):
    """The op on ``gen_vision.RMSNorm``'s own parameter gives the module's numbers (the block's unfused path)."""
    eager = RMSNorm(19, eps=1e-5)
    with torch.no_grad():
        eager.weight.normal_()
    eager = eager.to(device)
    x = _randn(2, 3, 19, device=device)
    torch.testing.assert_close(rms_norm(x, eager.weight, eager.eps), eager(x), rtol=1e-5, atol=1e-5)


# --- GRN -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 37), (1, 4, 3, 130), (1, 1, 1, 13)])
def test_grn_is_the_formula(device, impl, dtype, shape):
    n_ch = shape[-1]
    x = _randn(*shape, dtype=dtype, device=device)
    weight = _randn(1, 1, 1, n_ch, seed=1, dtype=dtype, device=device)
    bias = _randn(1, 1, 1, n_ch, seed=2, dtype=dtype, device=device)
    out = check_against_formula(
        lambda *a: grn(*a, EPS), lambda *a: formulas.grn(*a, EPS), [x, weight, bias], [True, True, True], dtype
    )
    assert out.dtype == dtype and out.shape == shape


def test_grn_zero_channel_has_finite_gradient(device):
    """A channel that is zero over H*W has gx = 0: torch.norm's backward gives it 0, so must the kernel."""
    x = _randn(2, 3, 4, 9, device=device)
    x[0, :, :, 4] = 0
    weight = _randn(1, 1, 1, 9, seed=1, device=device)
    bias = _randn(1, 1, 1, 9, seed=2, device=device)
    check_parity(
        lambda *a: grn(*a, EPS), lambda *a: grn_reference(*a, EPS), [x, weight, bias], [True, True, True], torch.float32
    )


def test_grn_bf16_input_fp32_params_promotes(device, impl):
    x = _randn(1, 3, 3, 10, dtype=torch.bfloat16, device=device)
    weight = _randn(1, 1, 1, 10, seed=1, device=device)
    bias = _randn(1, 1, 1, 10, seed=2, device=device)
    out = check_against_formula(
        lambda *a: grn(*a, EPS), lambda *a: formulas.grn(*a, EPS), [x, weight, bias], [True, True, True],
        torch.bfloat16,
    )
    assert out.dtype == torch.float32  # as eager: bias (fp32) + x (bf16) * (...) promotes


def test_grn_on_the_model_modules_parameters_equals_the_module(device):
    eager = GlobalResponseNorm(11)
    with torch.no_grad():
        eager.weight.normal_()
        eager.bias.normal_()
    eager = eager.to(device)
    x = _randn(2, 2, 3, 11, device=device)
    torch.testing.assert_close(grn(x, eager.weight, eager.bias, eager.eps), eager(x), rtol=1e-5, atol=1e-5)


def test_backward_accepts_broadcast_upstream_gradients(device):
    """``out.sum().backward()`` hands the kernels a stride-0 gradient; they must read it as such."""
    x = _randn(2, 5, 3, 4, device=device)
    weight = _randn(5, seed=1, device=device)
    gw, gb = _randn(1, 1, 1, 5, seed=2, device=device), _randn(1, 1, 1, 5, seed=3, device=device)
    for fused, ref, params in ((rms_norm, rms_norm_reference, (weight,)), (grn, grn_reference, (gw, gb))):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        fused(a.permute(0, 2, 3, 1), *params, EPS).sum().backward()
        ref(b.permute(0, 2, 3, 1), *params, EPS).sum().backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def test_strided_weights_are_read_by_their_strides(device):
    """A weight (or GRN bias) that is a strided view, e.g. every other value of a larger tensor, is
    read value by value as the reference reads it (the kernels address it as contiguous memory)."""
    x = _randn(2, 3, 8, device=device)
    w_rms = (1 + _randn(16, seed=1, device=device))[::2]  # stride 2
    check_parity(lambda t, w: rms_norm(t, w, EPS), lambda t, w: rms_norm_reference(t, w, EPS),
                 [x, w_rms], [True, True], torch.float32)
    xg = _randn(2, 3, 3, 5, device=device)
    w_grn, b_grn = _randn(1, 1, 1, 10, seed=2, device=device), _randn(1, 1, 1, 10, seed=3, device=device)
    check_parity(lambda t, w, b: grn(t, w[..., ::2], b[..., ::2], EPS),
                 lambda t, w, b: grn_reference(t, w[..., ::2], b[..., ::2], EPS),
                 [xg, w_grn, b_grn], [True, True, True], torch.float32)
