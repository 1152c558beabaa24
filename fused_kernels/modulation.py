"""Fused time-conditioned scale/shift of the ConvNeXt block, with the residual add folded in.

The tail of ``gen_vision.ConvNeXtBlock.forward`` is::

    x = x + h.permute(0, 3, 1, 2)                  # residual: MLP branch, channels-last
    return x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]

Eager runs three element-wise passes over [B, C, H, W] (add, multiply, add) and reads the permuted
branch with a transposed access. :func:`modulate` does it in one pass: it reads ``x`` (NCHW) and the
optional ``residual`` (any layout whose H and W merge, e.g. the permuted channels-last branch) by
their strides in [channel-block x pixel-block] tiles and writes a contiguous NCHW output. The
residual fusion is the "add others where they pay" part of the issue: it removes two full passes.

Backward is one pass too: it reads ``dout``, ``x`` and ``residual`` once and writes ``dx`` (which is
also the residual's gradient) and per-(sample, channel) partial sums of ``dscale = sum dout * (x + r)``
and ``dshift = sum dout``, reduced over pixel splits afterwards.

``scale`` and ``shift`` are [B, C] and may be strided views (the two halves of ``chunk(2, dim=1)``).
No parameters, so there is no module: call it from the block's forward.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from ._triton import cdiv, next_pow2, num_programs_hint, tl, triton_kernel
from .dispatch import reference_for, refuse_create_graph

__all__ = ["modulate"]


def _nchw_strides(t: Tensor) -> Optional[tuple[int, int, int]]:
    """(stride_b, stride_c, stride_pixel) when H and W of ``t`` [B, C, H, W] merge into one dim."""
    sb, sc, sh, sw = t.stride()
    _, _, height, width = t.shape
    if width == 1:
        return sb, sc, sh
    if height == 1 or sh == width * sw:
        return sb, sc, sw
    return None


def _as_nchw(t: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    strides = _nchw_strides(t)
    if strides is None:
        t = t.contiguous()
        strides = _nchw_strides(t)
    return t, strides


@triton_kernel
def _modulate_fwd_kernel(
    X, R, SCALE, SHIFT, OUT,
    n_ch, hw,
    sx_b, sx_c, sx_p, sr_b, sr_c, sr_p, ss_b, ss_c, sh_b, sh_c,
    HAS_RES: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # 64-bit offsets only per sample (scalar); within a sample they fit in 32 bits (checked by the caller)
    b = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    px = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    ch_ok = ch < n_ch
    mask = ch_ok[:, None] & (px < hw)[None, :]
    u = tl.load(X + b * sx_b + (ch[:, None] * sx_c + px[None, :] * sx_p), mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + b * sr_b + (ch[:, None] * sr_c + px[None, :] * sr_p), mask=mask, other=0.0)
        u += r.to(tl.float32)
    scale = tl.load(SCALE + b * ss_b + ch * ss_c, mask=ch_ok, other=0.0).to(tl.float32)
    shift = tl.load(SHIFT + b * sh_b + ch * sh_c, mask=ch_ok, other=0.0).to(tl.float32)
    out = u * (1.0 + scale)[:, None] + shift[:, None]
    tl.store(OUT + b * n_ch * hw + (ch[:, None] * hw + px[None, :]), out.to(OUT.dtype.element_ty), mask=mask)


@triton_kernel
def _modulate_bwd_kernel(
    DOUT, X, R, SCALE, DX, DSCALE_PART, DSHIFT_PART,
    n_ch, hw, px_per_split, n_splits,
    sd_b, sd_c, sd_p, sx_b, sx_c, sx_p, sr_b, sr_c, sr_p, ss_b, ss_c,
    HAS_RES: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(2)
    ch_ok = ch < n_ch
    one_plus_scale = 1.0 + tl.load(SCALE + b * ss_b + ch * ss_c, mask=ch_ok, other=0.0).to(tl.float32)
    dout_base = DOUT + b * sd_b
    x_base = X + b * sx_b
    r_base = R + b * sr_b
    dx_base = DX + b * n_ch * hw
    acc_scale = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    first = split * px_per_split
    for start in range(first, first + px_per_split, BLOCK_P):
        px = start + tl.arange(0, BLOCK_P)
        mask = ch_ok[:, None] & (px < hw)[None, :]
        dout = tl.load(dout_base + (ch[:, None] * sd_c + px[None, :] * sd_p), mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_base + (ch[:, None] * sx_c + px[None, :] * sx_p), mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(r_base + (ch[:, None] * sr_c + px[None, :] * sr_p), mask=mask, other=0.0)
            u += r.to(tl.float32)
        dx = dout * one_plus_scale[:, None]
        tl.store(dx_base + (ch[:, None] * hw + px[None, :]), dx.to(DX.dtype.element_ty), mask=mask)
        acc_scale += tl.sum(dout * u, axis=1)
        acc_shift += tl.sum(dout, axis=1)
    part = (b * n_splits + split) * n_ch + ch
    tl.store(DSCALE_PART + part, acc_scale, mask=ch_ok)
    tl.store(DSHIFT_PART + part, acc_shift, mask=ch_ok)


def _blocks(n_ch: int, hw: int) -> tuple[int, int]:
    """(channels, pixels) per tile, about 2048 elements (8 warps: 8 per thread per tensor)."""
    block_p = min(next_pow2(hw), 64)
    block_c = max(1, min(next_pow2(n_ch), 2048 // block_p))
    return block_c, block_p


def _fits_int32(t: Tensor, strides: tuple[int, int, int]) -> bool:
    """Offsets inside one sample fit in 32 bits (the kernels index within a sample in int32)."""
    _, n_ch, height, width = t.shape
    span = (n_ch - 1) * abs(strides[1]) + (height * width - 1) * abs(strides[2])
    return span < 2**31 and n_ch * height * width < 2**31


class _ModulateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor]) -> Tensor:
        batch, n_ch, height, width = x.shape
        hw = height * width
        x, sx = _as_nchw(x)
        has_res = residual is not None
        if has_res:
            residual, sr = _as_nchw(residual)
        else:
            residual, sr = x, sx
        dtypes = [x.dtype, scale.dtype, shift.dtype] + ([residual.dtype] if has_res else [])
        out_dtype = dtypes[0]
        for dt in dtypes[1:]:
            out_dtype = torch.promote_types(out_dtype, dt)
        out = torch.empty(batch, n_ch, height, width, device=x.device, dtype=out_dtype)
        block_c, block_p = _blocks(n_ch, hw)
        _modulate_fwd_kernel[(batch, cdiv(n_ch, block_c), cdiv(hw, block_p))](
            x, residual, scale, shift, out, n_ch, hw, *sx, *sr, *scale.stride(), *shift.stride(),
            HAS_RES=has_res, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=8,
        )
        ctx.save_for_backward(x, scale, residual if has_res else None)
        ctx.has_res = has_res
        ctx.dtypes = (x.dtype, scale.dtype, shift.dtype, residual.dtype)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        refuse_create_graph("modulate")
        x, scale, residual = ctx.saved_tensors
        has_res = ctx.has_res
        batch, n_ch, height, width = x.shape
        hw = height * width
        dout, sd = _as_nchw(dout)
        sx = _nchw_strides(x)
        sr = _nchw_strides(residual) if has_res else sx
        block_c, block_p = _blocks(n_ch, hw)
        c_blocks = cdiv(n_ch, block_c)
        want = max(1, num_programs_hint(x.device) // (batch * c_blocks))
        n_splits = max(1, min(want, cdiv(hw, block_p), 64))
        px_per_split = cdiv(cdiv(hw, block_p), n_splits) * block_p
        n_splits = cdiv(hw, px_per_split)
        x_dtype, scale_dtype, shift_dtype, res_dtype = ctx.dtypes
        dx = torch.empty(x.shape, device=x.device, dtype=x_dtype)
        dscale_part = torch.empty(batch, n_splits, n_ch, device=x.device, dtype=torch.float32)
        dshift_part = torch.empty_like(dscale_part)
        _modulate_bwd_kernel[(batch, c_blocks, n_splits)](
            dout, x, residual if has_res else x, scale, dx, dscale_part, dshift_part,
            n_ch, hw, px_per_split, n_splits, *sd, *sx, *sr, *scale.stride(),
            HAS_RES=has_res, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=8,
        )
        dscale = dscale_part.sum(1).to(scale_dtype)
        dshift = dshift_part.sum(1).to(shift_dtype)
        dres = None
        if has_res and ctx.needs_input_grad[3]:
            # The same gradient flows to x and to the residual (as for an eager add).
            dres = dx if res_dtype == x_dtype else dx.to(res_dtype)
        return dx, dscale, dshift, dres


def _per_sample_int32(x: Tensor, residual: Optional[Tensor]) -> bool:
    for t in (x, residual):
        if t is not None:
            strides = _nchw_strides(t) or (0, t.shape[2] * t.shape[3], 1)  # a copy would be contiguous
            if not _fits_int32(t, strides):
                return False
    return True


def modulate(x: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor] = None) -> Tensor:
    """``(x [+ residual]) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]``.

    Args:
        x: [B, C, H, W] (the block input, NCHW).
        scale, shift: [B, C], any strides.
        residual: optional [B, C, H, W], any layout (typically the channels-last MLP branch permuted
            to NCHW); added before the modulation.

    Returns a contiguous NCHW tensor in the promoted dtype of the inputs. Same numbers as
    ``fused_kernels.reference.modulate_reference``; Triton or reference per ``fused_kernels.dispatch``.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be [B, C, H, W], got shape {tuple(x.shape)}")
    if scale.shape != x.shape[:2] or shift.shape != x.shape[:2]:
        raise ValueError(
            f"scale and shift must be [B, C] = {tuple(x.shape[:2])}, got {tuple(scale.shape)}, {tuple(shift.shape)}"
        )
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must match x {tuple(x.shape)}, got {tuple(residual.shape)}")
    fits = x.numel() > 0 and _per_sample_int32(x, residual)
    fallback = reference_for("modulate", x, reference.modulate_reference, fits)
    if fallback is not None:
        return fallback(x, scale, shift, residual)
    return _ModulateFunction.apply(x, scale, shift, residual)
