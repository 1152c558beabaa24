"""Fused REPA cosine loss: row-wise cosine similarity with a stop-gradient target.

What is fused
-------------
``repa_cosine(projected, target)`` computes ``cos[b, p] = <p, f> / (max(|p|, eps) * max(|f|, eps))``
along D (``F.normalize``'s eps = 1e-12) in one pass over both inputs, one row per tile line, without
the two normalised float32 copies and the product that eager materialises. Backward re-reads the two
inputs (nothing but them is saved) and writes ``d cos / d projected`` times the incoming gradient in one
pass; the target gets no gradient. :func:`repa_loss_per_sample` is ``-cos.mean(dim=1)`` on top, so the
[B, P] mean runs in PyTorch (it is B*P numbers, not B*P*D).

Limits: a row (D) is held in one block, D <= 16384; wider inputs take the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from ._triton import cdiv, next_pow2, tl, triton_kernel
from .dispatch import reference_for, refuse_create_graph

__all__ = ["repa_cosine", "repa_loss_per_sample"]

MAX_REPA_DIM = 16384
_NORMALIZE_EPS = 1e-12  # F.normalize's default


@triton_kernel
def _cosine_fwd_kernel(P, F, COS, n_rows, dim, eps, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < dim)[None, :]
    offs = rows[:, None] * dim + cols[None, :]
    p = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(F + offs, mask=mask, other=0.0).to(tl.float32)
    # propagate_nan=ALL: as torch's clamp_min in F.normalize, a NaN norm stays NaN (the default max
    # would return eps for it, and the backward would then turn a NaN row into finite garbage)
    p_norm = tl.maximum(tl.sqrt(tl.sum(p * p, axis=1)), eps, propagate_nan=tl.PropagateNan.ALL)
    f_norm = tl.maximum(tl.sqrt(tl.sum(f * f, axis=1)), eps, propagate_nan=tl.PropagateNan.ALL)
    cos = tl.sum(p * f, axis=1) / (p_norm * f_norm)
    tl.store(COS + rows, cos, mask=row_ok)


@triton_kernel
def _cosine_bwd_kernel(P, F, DCOS, DP, n_rows, dim, eps, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < dim)[None, :]
    offs = rows[:, None] * dim + cols[None, :]
    p = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(F + offs, mask=mask, other=0.0).to(tl.float32)
    dcos = tl.load(DCOS + rows, mask=row_ok, other=0.0).to(tl.float32)
    p_len = tl.sqrt(tl.sum(p * p, axis=1))
    p_norm = tl.maximum(p_len, eps, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as in forward
    f_norm = tl.maximum(tl.sqrt(tl.sum(f * f, axis=1)), eps, propagate_nan=tl.PropagateNan.ALL)
    cos = tl.sum(p * f, axis=1) / (p_norm * f_norm)
    # d cos / dp = f / (|p| |f|) - cos * p / |p|^2; the second term only where |p| >= eps (clamp_min)
    coef_f = dcos / (p_norm * f_norm)
    coef_p = tl.where(p_len >= eps, dcos * cos / (p_norm * p_norm), 0.0)
    dp = coef_f[:, None] * f - coef_p[:, None] * p
    tl.store(DP + offs, dp.to(DP.dtype.element_ty), mask=mask)


def _blocks(dim: int) -> tuple[int, int, int]:
    block_d = next_pow2(dim)
    block_r = max(1, min(32, 4096 // block_d))
    warps = 4 if block_r * block_d <= 2048 else 8
    return block_r, block_d, warps


class _CosineFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, projected: Tensor, target: Tensor) -> Tensor:
        batch, n_pos, dim = projected.shape
        p = projected.contiguous()
        f = target.detach().contiguous()
        n_rows = batch * n_pos
        cos = torch.empty(batch, n_pos, device=p.device, dtype=torch.float32)
        block_r, block_d, warps = _blocks(dim)
        _cosine_fwd_kernel[(cdiv(n_rows, block_r),)](
            p, f, cos, n_rows, dim, _NORMALIZE_EPS, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps
        )
        ctx.save_for_backward(p, f)
        return cos

    @staticmethod
    def backward(ctx, dcos: Tensor):
        refuse_create_graph("repa_cosine")
        p, f = ctx.saved_tensors
        batch, n_pos, dim = p.shape
        n_rows = batch * n_pos
        dp = torch.empty_like(p)
        block_r, block_d, warps = _blocks(dim)
        _cosine_bwd_kernel[(cdiv(n_rows, block_r),)](
            p, f, dcos.contiguous(), dp, n_rows, dim, _NORMALIZE_EPS,
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
        )
        return dp, None


def repa_cosine(projected: Tensor, target_features: Tensor) -> Tensor:
    """[B, P] float32 cosine similarity along D of ``projected`` and the stop-gradient target [B, P, D]."""
    if projected.dim() != 3:
        raise ValueError(f"projected must be [B, P, D], got shape {tuple(projected.shape)}")
    if target_features.shape != projected.shape:
        raise ValueError(
            f"target_features must match projected {tuple(projected.shape)}, got {tuple(target_features.shape)}"
        )
    fits = projected.shape[-1] <= MAX_REPA_DIM and projected.numel() > 0
    fallback = reference_for("repa_cosine", projected, reference.repa_cosine_reference, fits)
    if fallback is not None:
        return fallback(projected, target_features)
    return _CosineFunction.apply(projected, target_features)


def repa_loss_per_sample(projected: Tensor, target_features: Tensor) -> Tensor:
    """[B] float32 ``-mean_p cos(projected[b, p], target[b, p])``; gradient to ``projected`` only.

    ``losses.repa_loss`` sums it over the batch (``LossTerm(total, count=B)``).
    """
    return -repa_cosine(projected, target_features).mean(dim=1)
