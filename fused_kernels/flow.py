"""Fused rectified-flow ops: the interpolation, the objective with its gradient, and the guided
Euler step of the sampler.

What is fused
-------------
``flow_interpolate(x, z0, t)``: ``z_t = t * x + (1 - t) * z0`` in one pass, cast to the model dtype
on the way out. ``z_t`` must exist before the model runs, so it cannot share a pass with the loss.

``rf_loss_per_sample(v_pred, x, z0)``: one forward pass reads ``v_pred``, ``x`` and ``z0`` and
  * forms the target ``x - z0`` in registers (never materialised; rounded to the inputs' dtype, as
    the reference's eager ``x - z0`` is),
  * accumulates the per-sample sum of ``(v - target)^2`` (float32, split over programs, the partial
    sums reduced afterwards in a fixed order: deterministic),
  * writes ``dL_b/dv = 2 (v - target) / N`` (float32) when ``v_pred`` requires grad.
Backward only multiplies that saved gradient by the incoming per-sample gradient (one element-wise
pass); ``x``, ``z0`` and ``v_pred`` are not kept for it. Eager instead materialises the target, a
float32 copy of ``v``, the error and its square, and keeps the float32 error for backward.

``cfg_euler_step(z, v_cond, v_uncond, w, dt)``: ``z + dt * (w * v_cond - (w - 1) * v_uncond)`` in
one pass (float32 math, result in ``z.dtype``; ``out=z`` updates in place). Sampling only: no autograd.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from ._triton import cdiv, num_programs_hint, tl, triton_kernel
from .dispatch import reference_for, refuse_create_graph

__all__ = ["flow_interpolate", "rf_loss_per_sample", "cfg_euler_step"]

_BLOCK = 1024

# how the kernel rounds the target x - z0 (formed in float32) to the data dtype
_TARGET_ROUNDING = {torch.bfloat16: 1, torch.float16: 2}


def _check_pair(x: Tensor, z0: Tensor) -> None:
    if x.shape != z0.shape:
        raise ValueError(f"x and z0 must have the same shape, got {tuple(x.shape)} and {tuple(z0.shape)}")
    if x.dim() < 2:
        raise ValueError(f"x must be [B, ...] with a non-batch dim, got {tuple(x.shape)}")


# --------------------------------------------------------------------------------------------------
# z_t
# --------------------------------------------------------------------------------------------------


@triton_kernel
def _interpolate_kernel(X, Z0, T, OUT, n_per_sample, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_per_sample
    idx = b * n_per_sample + offs
    t = tl.load(T + b).to(tl.float32)
    x = tl.load(X + idx, mask=mask, other=0.0).to(tl.float32)
    z0 = tl.load(Z0 + idx, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + idx, (t * x + (1.0 - t) * z0).to(OUT.dtype.element_ty), mask=mask)


def flow_interpolate(x: Tensor, z0: Tensor, t: Tensor, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``z_t = t * x + (1 - t) * z0`` for ``x``, ``z0`` [B, ...] and ``t`` [B]; result in ``out_dtype``
    (default: torch promotion of the three). The kernel has no backward (in training data, noise and
    t carry no grad); when one of them needs a gradient the differentiable reference runs instead."""
    _check_pair(x, z0)
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must be [B={x.shape[0]}], got shape {tuple(t.shape)}")
    # the kernel detaches its inputs: taking it for an input that needs a gradient would silently drop it
    needs_grad = torch.is_grad_enabled() and any(a.requires_grad for a in (x, z0, t))
    fits = x.numel() > 0 and not needs_grad
    fallback = reference_for("flow_interpolate", x, reference.flow_interpolate_reference, fits=fits)
    if fallback is not None:
        return fallback(x, z0, t, out_dtype)
    if out_dtype is None:
        out_dtype = torch.promote_types(torch.promote_types(x.dtype, z0.dtype), t.dtype)
    x, z0, t = x.detach().contiguous(), z0.detach().contiguous(), t.detach().contiguous()
    out = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    n = x[0].numel()
    _interpolate_kernel[(x.shape[0], cdiv(n, _BLOCK))](x, z0, t, out, n, BLOCK=_BLOCK, num_warps=4)
    return out


# --------------------------------------------------------------------------------------------------
# L_RF
# --------------------------------------------------------------------------------------------------


@triton_kernel
def _rf_loss_fwd_kernel(
    V, X, Z0, GRAD, PART,
    n_per_sample, per_split, n_splits, grad_factor,
    TARGET_ROUNDING: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    first = split * per_split
    for start in range(first, first + per_split, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n_per_sample
        idx = b * n_per_sample + offs
        v = tl.load(V + idx, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + idx, mask=mask, other=0.0).to(tl.float32)
        z0 = tl.load(Z0 + idx, mask=mask, other=0.0).to(tl.float32)
        # the target as the reference forms it: x - z0 rounded to the inputs' dtype
        target = x - z0
        if TARGET_ROUNDING == 1:
            # bf16, round to nearest even on the bits: Triton's interpreter truncates in .to(bf16)
            bits = target.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            target = bits.to(tl.float32, bitcast=True)
        elif TARGET_ROUNDING == 2:
            target = target.to(tl.float16).to(tl.float32)
        err = v - target
        acc += err * err
        if WRITE_GRAD:
            tl.store(GRAD + idx, err * grad_factor, mask=mask)
    tl.store(PART + b * n_splits + split, tl.sum(acc, axis=0))


@triton_kernel
def _scale_per_sample_kernel(G, S, OUT, n_per_sample, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_per_sample
    idx = b * n_per_sample + offs
    s = tl.load(S + b).to(tl.float32)
    g = tl.load(G + idx, mask=mask, other=0.0)
    tl.store(OUT + idx, (g * s).to(OUT.dtype.element_ty), mask=mask)


class _RFLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v_pred: Tensor, x: Tensor, z0: Tensor) -> Tensor:
        batch = v_pred.shape[0]
        n = v_pred[0].numel()
        v, x, z0 = v_pred.contiguous(), x.detach().contiguous(), z0.detach().contiguous()
        write_grad = ctx.needs_input_grad[0]
        want = max(1, num_programs_hint(v.device) // batch)
        n_splits = max(1, min(want, cdiv(n, _BLOCK), 256))
        per_split = cdiv(cdiv(n, _BLOCK), n_splits) * _BLOCK
        n_splits = cdiv(n, per_split)
        part = torch.empty(batch, n_splits, device=v.device, dtype=torch.float32)
        grad = torch.empty(v.shape, device=v.device, dtype=torch.float32) if write_grad else part
        _rf_loss_fwd_kernel[(batch, n_splits)](
            v, x, z0, grad, part, n, per_split, n_splits, 2.0 / n,
            TARGET_ROUNDING=_TARGET_ROUNDING.get(torch.promote_types(x.dtype, z0.dtype), 0), WRITE_GRAD=write_grad,
            BLOCK=_BLOCK, num_warps=4,
        )
        if write_grad:
            ctx.save_for_backward(grad)
        ctx.v_dtype = v_pred.dtype
        return part.sum(1) / n

    @staticmethod
    def backward(ctx, grad_per_sample: Tensor):
        refuse_create_graph("rf_loss_per_sample")
        (grad,) = ctx.saved_tensors
        batch = grad.shape[0]
        n = grad[0].numel()
        dv = torch.empty(grad.shape, device=grad.device, dtype=ctx.v_dtype)
        _scale_per_sample_kernel[(batch, cdiv(n, _BLOCK))](
            grad, grad_per_sample.float().contiguous(), dv, n, BLOCK=_BLOCK, num_warps=4
        )
        return dv, None, None


def rf_loss_per_sample(v_pred: Tensor, x: Tensor, z0: Tensor) -> Tensor:
    """[B] float32 per-sample rectified-flow loss ``mean_{elements} (v_pred - (x - z0))^2``.

    Gradient flows to ``v_pred`` only (the target is a constant). ``losses.rectified_flow_loss``
    sums it over the batch (``LossTerm(total, count=B)``).
    """
    _check_pair(x, z0)
    if v_pred.shape != x.shape:
        raise ValueError(f"v_pred must match x {tuple(x.shape)}, got {tuple(v_pred.shape)}")
    fallback = reference_for("rf_loss", v_pred, reference.rf_loss_per_sample_reference, fits=x.numel() > 0)
    if fallback is not None:
        return fallback(v_pred, x, z0)
    return _RFLossFunction.apply(v_pred, x, z0)


# --------------------------------------------------------------------------------------------------
# CFG + Euler (sampling)
# --------------------------------------------------------------------------------------------------


@triton_kernel
def _cfg_euler_kernel(Z, VC, VU, OUT, n, w, dt, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    z = tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
    vc = tl.load(VC + offs, mask=mask, other=0.0).to(tl.float32)
    vu = tl.load(VU + offs, mask=mask, other=0.0).to(tl.float32)
    v = w * vc - (w - 1.0) * vu
    tl.store(OUT + offs, (z + dt * v).to(OUT.dtype.element_ty), mask=mask)


@torch.no_grad()
def cfg_euler_step(
    z: Tensor, v_cond: Tensor, v_uncond: Tensor, cfg_weight: float, dt: float, out: Optional[Tensor] = None
) -> Tensor:
    """One guided Euler step ``z + dt * (w * v_cond - (w - 1) * v_uncond)`` (float32 math, ``z.dtype``).

    ``v_cond`` and ``v_uncond`` may be the two halves of one batched forward (``v.chunk(2)``).
    ``out``: where to write (``out=z`` steps in place); a new tensor by default.
    """
    if v_cond.shape != z.shape or v_uncond.shape != z.shape:
        raise ValueError(
            f"v_cond and v_uncond must match z {tuple(z.shape)}, got {tuple(v_cond.shape)}, {tuple(v_uncond.shape)}"
        )
    if out is not None and (out.shape != z.shape or out.dtype != z.dtype):
        raise ValueError("out must have the shape and dtype of z")
    fits = z.numel() > 0 and (out is None or out.is_contiguous())
    fallback = reference_for("cfg_euler_step", z, reference.cfg_euler_step_reference, fits)
    if fallback is not None:
        result = fallback(z, v_cond, v_uncond, cfg_weight, dt)
        return result if out is None else out.copy_(result)
    z_c, vc, vu = z.contiguous(), v_cond.contiguous(), v_uncond.contiguous()
    if out is None:
        out = torch.empty_like(z_c)
    n = z_c.numel()
    _cfg_euler_kernel[(cdiv(n, _BLOCK),)](z_c, vc, vu, out, n, float(cfg_weight), float(dt), BLOCK=_BLOCK, num_warps=4)
    return out
