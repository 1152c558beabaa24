"""PyTorch references of every fused op: the path ``fused_kernels.dispatch`` takes off CUDA (and, compiled,
where ``dispatch.CUDA_CHOICE`` prefers ``torch.compile`` to the kernel).

For the flow and REPA ops these are the only PyTorch statement of the computation: the losses
(``pretrain.losses``) and the text-to-image sampler's guided Euler update call the ops of this package
and have no code of their own for it. For the ConvNeXt ops the model's modules (``gen_vision.RMSNorm``,
``GlobalResponseNorm``, the tail of ``ConvNeXtBlock.forward``) are the unfused path; the references
keep the same numerics (float32 RMSNorm, ``torch.norm`` GRN). They take and return the same arguments
as the public ops of ``fused_kernels.norms``, ``fused_kernels.modulation``, ``fused_kernels.flow`` and ``fused_kernels.repa``
and are differentiable by ordinary autograd.

Neither the references nor the kernels are the yardstick of the other: the tests hold both to float64
re-derivations of the papers' formulas (``tests/fused_kernels/formulas.py``).

Numerics of the Triton kernels versus these (documented once here): the kernels load any float
dtype, compute in float32 and round once to the output dtype. Where the eager code rounds
intermediates to a low-precision dtype (e.g. ``1 + scale`` in bf16), the kernels are the more
accurate of the two; the tests use bf16 tolerances for bf16 inputs.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


# --- ConvNeXt-V2 block -------------------------------------------------------------------------


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim in float32, cast back to ``x.dtype`` (numerics of ``gen_vision.RMSNorm``)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * weight.float()).to(x.dtype)


def grn_reference(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """ConvNeXt-V2 GRN on channels-last ``x`` [B, H, W, C]; ``weight``, ``bias`` [1, 1, 1, C]
    (``gen_vision.GlobalResponseNorm``): ``bias + x * (weight * nx + 1)`` with
    ``nx = ||x||_{H,W} / (mean_C ||x||_{H,W} + eps)``."""
    gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + eps)
    return bias + x * (weight * nx + 1)


def modulate_reference(x: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor] = None) -> Tensor:
    """Time-conditioned scale/shift on NCHW ``x`` [B, C, H, W]; ``scale``, ``shift`` [B, C]:
    ``(x [+ residual]) * (1 + scale) + shift`` (the tail of ``gen_vision.ConvNeXtBlock.forward``,
    where ``residual`` is the block's MLP branch ``h.permute(0, 3, 1, 2)``)."""
    if residual is not None:
        x = x + residual
    return x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]


# --- Rectified flow ----------------------------------------------------------------------------


def flow_interpolate_reference(x: Tensor, z0: Tensor, t: Tensor, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``z_t = t * x + (1 - t) * z0`` with ``t`` [B] broadcast, cast to ``out_dtype`` when given (the
    model input dtype); differentiable in all three."""
    tb = t.reshape(t.shape[0], *([1] * (x.dim() - 1)))
    z_t = tb * x + (1 - tb) * z0
    return z_t if out_dtype is None else z_t.to(out_dtype)


def rf_loss_per_sample_reference(v_pred: Tensor, x: Tensor, z0: Tensor) -> Tensor:
    """[B] float32: ``mean_{elements} (v_pred - (x - z0))^2`` per sample; the target is a constant.

    The target ``x - z0`` is formed in the inputs' dtype (the Triton kernel rounds it the same way).
    """
    target = (x - z0).detach()
    err = v_pred.float() - target.float()
    return err.square().flatten(1).mean(dim=1)


def cfg_euler_step_reference(z: Tensor, v_cond: Tensor, v_uncond: Tensor, cfg_weight: float, dt: float) -> Tensor:
    """One Euler step of the guided velocity: ``z + dt * (w * v_cond - (w - 1) * v_uncond)``,
    computed in float32 and returned in ``z.dtype`` (the sampler keeps ``z`` in float32)."""
    w = float(cfg_weight)
    v = w * v_cond.float() - (w - 1.0) * v_uncond.float()
    return (z.float() + float(dt) * v).to(z.dtype)


# --- REPA --------------------------------------------------------------------------------------


def repa_cosine_reference(projected: Tensor, target_features: Tensor) -> Tensor:
    """[B, P] float32 cosine similarity along D of ``projected`` [B, P, D] and the stop-gradient
    ``target_features`` [B, P, D], through ``F.normalize`` (its eps = 1e-12 for zero rows)."""
    p_hat = F.normalize(projected.float(), dim=-1)
    f_hat = F.normalize(target_features.detach().float(), dim=-1)
    return (p_hat * f_hat).sum(dim=-1)


def repa_loss_per_sample_reference(projected: Tensor, target_features: Tensor) -> Tensor:
    """[B] float32: ``-mean_p cos(projected[b, p], target[b, p])``."""
    return -repa_cosine_reference(projected, target_features).mean(dim=1)
