"""Forward and backward comparison of a fused op against its PyTorch reference."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

# (rtol, atol as a fraction of the largest reference magnitude)
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2)}


def _leaves(inputs: Sequence, dtype_of: Callable, grad_mask: Sequence[bool]) -> list:
    out = []
    for x, wants_grad in zip(inputs, grad_mask):
        if isinstance(x, torch.Tensor):
            x = x.detach().to(dtype_of(x)).clone().requires_grad_(wants_grad)
        out.append(x)
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    rtol, atol_frac = TOLERANCES[dtype]
    scale = max(float(expected.detach().abs().max()), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.detach().float(), expected.detach().float(), rtol=rtol, atol=atol_frac * scale,
        msg=lambda m: f"{what}: {m}",
    )


def check_parity(
    fused: Callable,
    ref: Callable,
    inputs: Sequence,
    grad_mask: Sequence[bool],
    dtype: torch.dtype,
    grad_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run ``fused`` on ``inputs`` (tensors as given) and ``ref`` on float32 copies of them; compare the
    outputs and the gradients of the inputs flagged in ``grad_mask`` (``dtype`` sets the tolerance).

    The backward seed is ``grad_out`` or a random tensor of the output's shape, the same values for
    both. Returns the fused output.
    """
    fused_in = _leaves(inputs, lambda x: x.dtype, grad_mask)
    gold_in = _leaves(inputs, lambda x: torch.float32 if x.is_floating_point() else x.dtype, grad_mask)
    out = fused(*fused_in)
    gold = ref(*gold_in)
    assert out.shape == gold.shape, (out.shape, gold.shape)
    assert_close(out, gold, dtype, "output")
    if not any(grad_mask):
        return out
    if grad_out is None:
        grad_out = torch.randn(gold.shape, generator=torch.Generator().manual_seed(7)).to(out.device)
    seed = grad_out.to(out.device, out.dtype)
    out.backward(seed)
    gold.backward(seed.float())
    for i, (a, b, wants) in enumerate(zip(fused_in, gold_in, grad_mask)):
        if wants:
            assert a.grad is not None, f"input {i} got no gradient"
            assert a.grad.dtype == a.dtype, (i, a.grad.dtype, a.dtype)
            assert_close(a.grad, b.grad, dtype, f"grad of input {i}")
    return out


# Largest error allowed against a float64 formula (``tests.fused_kernels.formulas``), as a fraction of the
# formula's largest magnitude. Measured over all 232 comparisons of the test shapes, Triton
# (interpreted) and reference alike: float32 inputs <= 3.2e-7 (outputs and gradients); bfloat16
# <= 6.7e-3 (roundings to bf16 of results and intermediates, and for L_RF the target x - z0 rounded
# to the data dtype as eager forms it).
FORMULA_TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


def assert_near(actual: torch.Tensor, exact: torch.Tensor, max_rel: float, what: str) -> None:
    """``max |actual - exact| <= max_rel * max |exact|`` (``exact`` in float64)."""
    assert actual.shape == exact.shape, (what, actual.shape, exact.shape)
    scale = float(exact.detach().abs().max()) if exact.numel() else 0.0
    error = float((actual.detach().double() - exact.detach().double()).abs().max()) if exact.numel() else 0.0
    assert error <= max_rel * max(scale, 1e-30), f"{what}: max error {error:.3g} > {max_rel:g} x {scale:.3g}"


def check_against_formula(
    op: Callable,
    formula: Callable,
    inputs: Sequence,
    grad_mask: Sequence[bool],
    dtype: torch.dtype,
    grad_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run ``op`` on ``inputs`` (as given) and ``formula`` on float64 copies; compare the outputs and
    the gradients of the inputs flagged in ``grad_mask`` within ``FORMULA_TOLERANCE[dtype]``."""
    max_rel = FORMULA_TOLERANCE[dtype]
    leaves = _leaves(inputs, lambda x: x.dtype, grad_mask)
    exact_in = _leaves(inputs, lambda x: torch.float64 if x.is_floating_point() else x.dtype, grad_mask)
    out = op(*leaves)
    exact = formula(*exact_in)
    assert_near(out, exact, max_rel, "output")
    if not any(grad_mask):
        return out
    if grad_out is None:
        grad_out = torch.randn(exact.shape, generator=torch.Generator().manual_seed(7))
    seed = grad_out.to(out.device, out.dtype)
    out.backward(seed)
    exact.backward(seed.double())
    for i, (a, b, wants) in enumerate(zip(leaves, exact_in, grad_mask)):
        if wants:
            assert a.grad is not None and a.grad.dtype == a.dtype, f"input {i}: gradient missing or of another dtype"
            assert_near(a.grad, b.grad, max_rel, f"grad of input {i}")
    return out


def record_launches(monkeypatch) -> list[str]:
    """From now until the test ends: the names of the Triton kernels launched (they still run)."""
    from fused_kernels import _triton

    launched: list[str] = []
    original = _triton.TritonKernel.__getitem__

    def recording(self, grid):
        launched.append(self.__name__)
        return original(self, grid)

    monkeypatch.setattr(_triton.TritonKernel, "__getitem__", recording)
    return launched
