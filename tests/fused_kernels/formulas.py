"""The formulas the kernels implement, re-derived from the papers in a few lines of float64.

Independent of ``fused_kernels/reference.py`` and of the model and loss code: each line is the paper's
equation as written there (JanusFlow, arXiv 2411.07975, Sec. 3; RMSNorm, Zhang & Sennrich 2019;
GRN, ConvNeXt V2 Eq. 1-3), computed in float64 so that it is the yardstick of both the Triton kernel
and the PyTorch reference. Differentiable: autograd through them gives the reference gradients.
"""

from __future__ import annotations

from torch import Tensor


def _per_sample(t: Tensor, like: Tensor) -> Tensor:
    return t.double().reshape(-1, *[1] * (like.dim() - 1))


def flow_point(x: Tensor, z0: Tensor, t: Tensor) -> Tensor:
    """Eq. 3: ``z_t = t x + (1 - t) z0``."""
    t = _per_sample(t, x)
    return t * x.double() + (1 - t) * z0.double()


def rf_loss_per_sample(v: Tensor, x: Tensor, z0: Tensor) -> Tensor:
    """Eq. 7 per sample: ``||v - (x - z0)||^2``, averaged over the sample's elements (target constant)."""
    err = v.double() - (x.double() - z0.double()).detach()
    return (err * err).reshape(len(v), -1).mean(dim=1)


def guided_euler_step(z: Tensor, v_cond: Tensor, v_uncond: Tensor, w: float, dt: float) -> Tensor:
    """Eq. 4 with Eq. 5: ``z + dt (w v(.|c) + (1 - w) v(.|0))``."""
    return z.double() + dt * (w * v_cond.double() + (1 - w) * v_uncond.double())


def cosine(p: Tensor, f: Tensor) -> Tensor:
    """Eq. 8's ``sim`` per position: ``<p, f> / (|p| |f|)`` along the last dim; ``f`` is stop-gradient."""
    p, f = p.double(), f.double().detach()
    return (p * f).sum(-1) / (p.pow(2).sum(-1).sqrt() * f.pow(2).sum(-1).sqrt())


def repa_loss_per_sample(p: Tensor, f: Tensor) -> Tensor:
    """Eq. 8 per sample: minus the mean over positions of the cosine similarity."""
    return -cosine(p, f).mean(dim=1)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm: ``x / sqrt(mean(x^2) + eps) * g`` over the last dim."""
    x = x.double()
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * weight.double()


def grn(x: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> Tensor:
    """ConvNeXt V2 GRN on channels-last ``x`` [B, H, W, C]: ``G = ||X||_2`` over H, W per channel,
    ``N = G / (mean_C G + eps)``, ``out = gamma (X N) + beta + X``."""
    x = x.double()
    g = x.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()
    n = g / (g.mean(dim=-1, keepdim=True) + eps)
    return gamma.double() * (x * n) + beta.double() + x


def modulate(x: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None) -> Tensor:
    """The ConvNeXt block's tail on NCHW: ``(x + residual) (1 + scale) + shift``, scale/shift per (B, C)."""
    y = x.double() + (0 if residual is None else residual.double())
    return y * (1 + scale.double()[:, :, None, None]) + shift.double()[:, :, None, None]
