"""PyTorch references of every fused op: the semantics the Triton kernels must reproduce.

Each function is written the way the model and loss code computes the same thing
(``pretrain.model.gen_vision`` and ``pretrain.losses``), so the reference path of a fused op gives
exactly the numbers of the unfused model. They take and return the same arguments as the public
ops of ``kernels.norms``, ``kernels.modulation``, ``kernels.flow`` and ``kernels.repa`` and are
differentiable by ordinary autograd, which the parity tests use as the gradient reference.

Numerics of the Triton kernels versus these (documented once here): the kernels load any float
dtype, compute in float32 and round once to the output dtype. Where the eager code rounds
intermediates to a low-precision dtype (e.g. ``1 + scale`` in bf16), the kernels are the more
accurate of the two; the parity tests use bf16 tolerances for bf16 inputs.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


# --- ConvNeXt-V2 block -------------------------------------------------------------------------


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim in float32, cast back to ``x.dtype`` (``gen_vision.RMSNorm``)."""
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
    """``z_t = t * x + (1 - t) * z0`` with ``t`` [B] broadcast (``losses.interpolate_flow``), cast to
    ``out_dtype`` when given (the model input dtype)."""
    tb = t.reshape(t.shape[0], *([1] * (x.dim() - 1)))
    z_t = tb * x + (1 - tb) * z0
    return z_t if out_dtype is None else z_t.to(out_dtype)


def rf_loss_per_sample_reference(v_pred: Tensor, x: Tensor, z0: Tensor) -> Tensor:
    """[B] float32: ``mean_{elements} (v_pred - (x - z0))^2`` per sample; the target is a constant.

    Equals ``losses.rectified_flow_loss(v_pred, interpolate_flow(x, z0, t)[1])`` summand by summand
    (the target ``x - z0`` is formed in the inputs' dtype, as ``interpolate_flow`` does).
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
    ``target_features`` [B, P, D], through ``F.normalize`` as ``losses.repa_loss`` computes it."""
    p_hat = F.normalize(projected.float(), dim=-1)
    f_hat = F.normalize(target_features.detach().float(), dim=-1)
    return (p_hat * f_hat).sum(dim=-1)


def repa_loss_per_sample_reference(projected: Tensor, target_features: Tensor) -> Tensor:
    """[B] float32: ``-mean_p cos(projected[b, p], target[b, p])`` (the summands of ``losses.repa_loss``)."""
    return -repa_cosine_reference(projected, target_features).mean(dim=1)
