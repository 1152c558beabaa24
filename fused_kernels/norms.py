"""Fused RMSNorm and ConvNeXt-V2 GRN (Triton), on the parameters of ``pretrain.model.gen_vision``'s
``RMSNorm`` (``weight`` [C]) and ``GlobalResponseNorm`` (``weight``, ``bias`` [1, 1, 1, C]); the
ConvNeXt block calls them through ``fused_kernels.convnext`` (no module of their own: the model keeps its
modules and state dict).

What is fused
-------------
RMSNorm, one pass each way. Forward reads ``x`` once and writes ``y`` plus a float32 ``rstd`` per
row; backward reads ``dy``, ``x`` and ``rstd`` once and writes ``dx`` and per-program partial sums of
``dweight`` (summed over programs afterwards, deterministically). The input may be any strided view
whose leading dims after the first merge into one (e.g. ``dwconv(x).permute(0, 2, 3, 1)`` of an NCHW
tensor): the kernel reads the strides directly, so the copy that ``.contiguous()`` or the following
``Linear`` would make is folded into the norm. The output is always contiguous.

GRN, three launches each way instead of eager's chain of reductions and broadcasts:
forward = (1) per-(sample, channel) sum of squares over H*W, split over programs, (2) a per-sample
stats kernel: ``gx = sqrt(ss)``, ``1 / (mean_C gx + eps)`` and the channel factor
``s = weight * nx + 1``, (3) ``y = x * s + bias``. Backward = (1) sums over H*W of ``dy * x`` and ``dy``,
(2) per-sample stats: ``dweight``, ``dbias`` partials and the factor ``g`` of the path through the
norm, (3) ``dx = dy * s + x * g``. ``x`` is read twice forward and twice backward, ``dy`` twice.

Limits: RMSNorm holds a row in one block (C <= 16384); GRN indexes within a sample in 32 bits
(H*W*C < 2**31). Larger inputs take the reference.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from ._triton import cdiv, next_pow2, num_programs_hint, tl, triton_kernel
from .dispatch import reference_for, refuse_create_graph

__all__ = ["rms_norm", "grn"]

MAX_RMS_NORM_COLS = 16384


# --------------------------------------------------------------------------------------------------
# Layout helper
# --------------------------------------------------------------------------------------------------


def _row_layout(x: Tensor) -> Optional[tuple[int, int, int, int, int]]:
    """(outer, inner, stride_outer, stride_inner, stride_col) addressing ``x`` [D0, ..., C] as rows
    ``r = o * inner + i`` with offset ``o * stride_outer + i * stride_inner + c * stride_col``;
    ``None`` when the dims between the first and the last do not merge into one stride."""
    sizes, strides = x.shape[1:-1], x.stride()[1:-1]
    inner_stride, expected = 0, None
    for size, stride in reversed(list(zip(sizes, strides))):
        if size == 1:
            continue
        if expected is not None and stride != expected:
            return None
        if expected is None:
            inner_stride = stride
        expected = stride * size
    inner = 1
    for size in sizes:
        inner *= size
    return x.shape[0], inner, x.stride(0), inner_stride, x.stride(-1)


def _as_rows(x: Tensor) -> tuple[Tensor, tuple[int, int, int, int, int]]:
    if x.dim() == 1:
        x = x.unsqueeze(0)
    layout = _row_layout(x)
    if layout is None:
        x = x.contiguous()
        layout = _row_layout(x)
    return x, layout


def _warps(block_elems: int) -> int:
    return 4 if block_elems <= 1024 else 8 if block_elems <= 8192 else 16


# --------------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------------


@triton_kernel
def _rms_norm_fwd_kernel(
    X, W, Y, RSTD,
    n_rows, inner, n_cols, eps,
    sx_o, sx_i, sx_c,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    x_off = (rows // inner) * sx_o + (rows % inner) * sx_i
    x = tl.load(X + x_off[:, None] + cols[None, :] * sx_c, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + rows[:, None] * n_cols + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton_kernel
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DX, DW_PART,
    n_rows, inner, n_cols, rows_per_program,
    sdy_o, sdy_i, sdy_c, sx_o, sx_i, sx_c,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    for start in range(first, first + rows_per_program, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        o, i = rows // inner, rows % inner
        dy = tl.load(DY + (o * sdy_o + i * sdy_i)[:, None] + cols[None, :] * sdy_c, mask=mask, other=0.0)
        x = tl.load(X + (o * sx_o + i * sx_i)[:, None] + cols[None, :] * sx_c, mask=mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        dy = dy.to(tl.float32)
        x_hat = x.to(tl.float32) * rstd[:, None]
        wdy = dy * w[None, :]
        proj = tl.sum(wdy * x_hat, axis=1) / n_cols
        dx = (wdy - x_hat * proj[:, None]) * rstd[:, None]
        tl.store(DX + rows[:, None] * n_cols + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * x_hat, axis=0)
    tl.store(DW_PART + pid * n_cols + cols, dw, mask=col_ok)


def _rms_blocks(n_cols: int, backward: bool = False) -> tuple[int, int]:
    """(rows, columns) per tile: the row whole, about 4096 elements forward and 2048 backward
    (backward keeps five tiles live; more would spill registers at 8 warps)."""
    block_c = next_pow2(n_cols)
    block_r = max(1, min(64, (2048 if backward else 4096) // block_c))
    return block_r, block_c


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        shape = x.shape
        weight = weight.contiguous()  # the kernels read it at W + c (a strided view would be misread)
        x, (outer, inner, sx_o, sx_i, sx_c) = _as_rows(x)
        n_cols = x.shape[-1]
        n_rows = outer * inner
        y = torch.empty(shape, dtype=x.dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block_r, block_c = _rms_blocks(n_cols)
        if n_rows:
            _rms_norm_fwd_kernel[(cdiv(n_rows, block_r),)](
                x, weight, y, rstd, n_rows, inner, n_cols, float(eps), sx_o, sx_i, sx_c,
                BLOCK_R=block_r, BLOCK_C=block_c, num_warps=_warps(block_r * block_c),
            )
        ctx.save_for_backward(x, weight, rstd)
        ctx.shape = shape
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        refuse_create_graph("rms_norm")
        x, weight, rstd = ctx.saved_tensors
        dy = dy.reshape(x.shape) if dy.dim() != x.dim() else dy
        dy, (_, _, sdy_o, sdy_i, sdy_c) = _as_rows(dy)
        _, (outer, inner, sx_o, sx_i, sx_c) = _as_rows(x)
        n_cols = x.shape[-1]
        n_rows = outer * inner
        block_r, block_c = _rms_blocks(n_cols, backward=True)
        n_blocks = cdiv(n_rows, block_r)
        n_programs = max(1, min(n_blocks, num_programs_hint(x.device)))
        rows_per_program = cdiv(n_blocks, n_programs) * block_r
        n_programs = max(1, cdiv(n_rows, rows_per_program))
        dx = torch.empty(ctx.shape, dtype=x.dtype, device=x.device)
        dw_part = torch.zeros(n_programs, n_cols, dtype=torch.float32, device=x.device)
        if n_rows:
            _rms_norm_bwd_kernel[(n_programs,)](
                dy, x, weight, rstd, dx, dw_part, n_rows, inner, n_cols, rows_per_program,
                sdy_o, sdy_i, sdy_c, sx_o, sx_i, sx_c,
                BLOCK_R=block_r, BLOCK_C=block_c, num_warps=_warps(block_r * block_c),
            )
        dw = dw_part.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last dim of ``x`` [..., C] in float32, output in ``x.dtype`` (contiguous).

    Same numbers as ``pretrain.model.gen_vision.RMSNorm``; Triton or reference per ``fused_kernels.dispatch``.
    """
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must be [{x.shape[-1]}], got {tuple(weight.shape)}")
    fits = x.shape[-1] <= MAX_RMS_NORM_COLS and x.numel() > 0
    fallback = reference_for("rms_norm", x, reference.rms_norm_reference, fits)
    if fallback is not None:
        return fallback(x, weight, eps)
    return _RMSNormFunction.apply(x, weight, eps)


# --------------------------------------------------------------------------------------------------
# GRN (channels-last [B, H, W, C])
# --------------------------------------------------------------------------------------------------


@triton_kernel
def _grn_reduce_kernel(
    A, B, PART_AB, PART_A,
    hw, n_ch, rows_per_split, n_splits,
    SQUARE: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Partial sums over a chunk of H*W rows of one sample, for a block of channels.

    SQUARE: PART_AB[b, s, c] = sum x^2 (A = x; B, PART_A unused).
    else:   PART_AB[b, s, c] = sum a * b and PART_A[b, s, c] = sum a (A = dy, B = x).
    """
    b = tl.program_id(0)
    split = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < n_ch
    base = b.to(tl.int64) * hw * n_ch  # 64-bit per sample; within a sample 32-bit offsets (checked by grn())
    A += base
    B += base
    first = split * rows_per_split
    acc_ab = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    for start in range(first, first + rows_per_split, BLOCK_HW):
        rows = start + tl.arange(0, BLOCK_HW)
        mask = (rows < hw)[:, None] & col_ok[None, :]
        offs = rows[:, None] * n_ch + cols[None, :]
        a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
        if SQUARE:
            acc_ab += a * a
        else:
            bb = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
            acc_ab += a * bb
            acc_a += a
    out = (b * n_splits + split) * n_ch + cols
    tl.store(PART_AB + out, tl.sum(acc_ab, axis=0), mask=col_ok)
    if not SQUARE:
        tl.store(PART_A + out, tl.sum(acc_a, axis=0), mask=col_ok)


@triton_kernel
def _grn_stats_fwd_kernel(
    PART, W, GX, SCALE, INV_DENOM,
    n_ch, n_splits, eps,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per sample b: gx = sqrt(sum of squares), 1 / (mean_C gx + eps), scale = w * gx / (...) + 1."""
    b = tl.program_id(0)
    splits = tl.arange(0, BLOCK_S)
    split_ok = splits < n_splits
    total = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, n_ch, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < n_ch
        part = tl.load(
            PART + (b * n_splits + splits)[:, None] * n_ch + cols[None, :],
            mask=split_ok[:, None] & col_ok[None, :], other=0.0,
        )
        gx = tl.sqrt(tl.sum(part, axis=0))
        tl.store(GX + b * n_ch + cols, gx, mask=col_ok)
        total += gx
    inv_denom = 1.0 / (tl.sum(total, axis=0) / n_ch + eps)
    tl.store(INV_DENOM + b, inv_denom)
    for c0 in range(0, n_ch, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < n_ch
        gx = tl.load(GX + b * n_ch + cols, mask=col_ok, other=0.0)
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(SCALE + b * n_ch + cols, w * (gx * inv_denom) + 1.0, mask=col_ok)


@triton_kernel
def _grn_stats_bwd_kernel(
    PART_DYX, PART_DY, W, GX, INV_DENOM, G, DW_PART, DB_PART,
    n_ch, n_splits,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per sample b, with ds = sum_hw dy * x: dweight partial ds * nx, dbias partial sum_hw dy, and
    g = dgx / gx, the coefficient of x in dx from the path through nx (0 where gx = 0)."""
    b = tl.program_id(0)
    splits = tl.arange(0, BLOCK_S)
    split_ok = splits < n_splits
    inv_denom = tl.load(INV_DENOM + b)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, n_ch, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < n_ch
        offs = (b * n_splits + splits)[:, None] * n_ch + cols[None, :]
        mask = split_ok[:, None] & col_ok[None, :]
        ds = tl.sum(tl.load(PART_DYX + offs, mask=mask, other=0.0), axis=0)
        db = tl.sum(tl.load(PART_DY + offs, mask=mask, other=0.0), axis=0)
        gx = tl.load(GX + b * n_ch + cols, mask=col_ok, other=0.0)
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        dnx = ds * w
        tl.store(DW_PART + b * n_ch + cols, ds * (gx * inv_denom), mask=col_ok)
        tl.store(DB_PART + b * n_ch + cols, db, mask=col_ok)
        tl.store(G + b * n_ch + cols, dnx, mask=col_ok)
        acc += dnx * gx
    # nx_c = gx_c / denom, denom = mean_C gx + eps:  dgx_k = dnx_k / denom - sum_c dnx_c gx_c / (C denom^2)
    corr = tl.sum(acc, axis=0) * inv_denom * inv_denom / n_ch
    for c0 in range(0, n_ch, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < n_ch
        dnx = tl.load(G + b * n_ch + cols, mask=col_ok, other=0.0)
        gx = tl.load(GX + b * n_ch + cols, mask=col_ok, other=0.0)
        dgx = dnx * inv_denom - corr
        # d||x|| / dx = x / ||x||, taken as 0 at ||x|| = 0 (as torch.norm's backward does)
        g = tl.where(gx > 0, dgx / tl.where(gx > 0, gx, 1.0), 0.0)
        tl.store(G + b * n_ch + cols, g, mask=col_ok)


@triton_kernel
def _grn_apply_kernel(
    A, B, P, Q, OUT,
    hw, n_ch,
    HAS_B: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """OUT = A * P[b, c] + (B * Q[b, c] if HAS_B else Q[c]).

    Forward: A = x, P = scale, Q = bias.  Backward: A = dy, P = scale, B = x, Q = g.
    """
    b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < n_ch
    mask = (rows < hw)[:, None] & col_ok[None, :]
    base = b.to(tl.int64) * hw * n_ch
    offs = rows[:, None] * n_ch + cols[None, :]
    p = tl.load(P + b * n_ch + cols, mask=col_ok, other=0.0)
    a = tl.load(A + base + offs, mask=mask, other=0.0).to(tl.float32)
    out = a * p[None, :]
    if HAS_B:
        q = tl.load(Q + b * n_ch + cols, mask=col_ok, other=0.0)
        bb = tl.load(B + base + offs, mask=mask, other=0.0).to(tl.float32)
        out += bb * q[None, :]
    else:
        q = tl.load(Q + cols, mask=col_ok, other=0.0).to(tl.float32)
        out += q[None, :]
    tl.store(OUT + base + offs, out.to(OUT.dtype.element_ty), mask=mask)


def _grn_blocks(n_ch: int) -> tuple[int, int]:
    block_c = min(next_pow2(n_ch), 128)
    block_hw = max(1, min(32, 4096 // block_c))
    return block_hw, block_c


def _grn_stats_blocks(n_splits: int, n_ch: int) -> tuple[int, int]:
    """(splits, channels) per tile of the per-sample stats kernels: all splits, ~2048 elements."""
    block_s = next_pow2(n_splits)
    return block_s, max(16, min(next_pow2(n_ch), 2048 // block_s))


def _grn_splits(batch: int, hw: int, n_ch: int, block_hw: int, block_c: int, device: torch.device) -> tuple[int, int]:
    """(n_splits, rows_per_split): split H*W so the reduction launches about a few waves of programs."""
    want = max(1, num_programs_hint(device) // max(1, batch * cdiv(n_ch, block_c)))
    n_splits = max(1, min(want, cdiv(hw, block_hw), 64))
    rows_per_split = cdiv(cdiv(hw, block_hw), n_splits) * block_hw
    return cdiv(hw, rows_per_split), rows_per_split


class _GRNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        x = x.contiguous()
        batch, height, width, n_ch = x.shape
        hw = height * width
        dev = x.device
        # the kernels read weight and bias at W + c: a strided view (e.g. w[..., ::2]) must be copied
        w = weight.reshape(n_ch).contiguous()
        out_dtype = torch.promote_types(x.dtype, torch.promote_types(weight.dtype, bias.dtype))
        out = torch.empty(x.shape, device=dev, dtype=out_dtype)
        block_hw, block_c = _grn_blocks(n_ch)
        n_splits, rows_per_split = _grn_splits(batch, hw, n_ch, block_hw, block_c, dev)
        part = torch.empty(batch, n_splits, n_ch, device=dev, dtype=torch.float32)
        gx = torch.empty(batch, n_ch, device=dev, dtype=torch.float32)
        scale = torch.empty(batch, n_ch, device=dev, dtype=torch.float32)
        inv_denom = torch.empty(batch, device=dev, dtype=torch.float32)
        warps = _warps(block_hw * block_c)
        _grn_reduce_kernel[(batch, n_splits, cdiv(n_ch, block_c))](
            x, x, part, part, hw, n_ch, rows_per_split, n_splits,
            SQUARE=True, BLOCK_HW=block_hw, BLOCK_C=block_c, num_warps=warps,
        )
        block_s, stats_c = _grn_stats_blocks(n_splits, n_ch)
        _grn_stats_fwd_kernel[(batch,)](
            part, w, gx, scale, inv_denom, n_ch, n_splits, float(eps),
            BLOCK_S=block_s, BLOCK_C=stats_c, num_warps=4,
        )
        _grn_apply_kernel[(batch, cdiv(hw, block_hw), cdiv(n_ch, block_c))](
            x, x, scale, bias.reshape(n_ch).contiguous(), out, hw, n_ch,
            HAS_B=False, BLOCK_HW=block_hw, BLOCK_C=block_c, num_warps=warps,
        )
        ctx.save_for_backward(x, w, gx, scale, inv_denom)
        ctx.param_dtypes = (weight.dtype, bias.dtype)
        return out

    @staticmethod
    def backward(ctx, dy: Tensor):
        refuse_create_graph("grn")
        x, weight, gx, scale, inv_denom = ctx.saved_tensors
        dy = dy.contiguous()
        batch, height, width, n_ch = x.shape
        hw = height * width
        dev = x.device
        block_hw, block_c = _grn_blocks(n_ch)
        n_splits, rows_per_split = _grn_splits(batch, hw, n_ch, block_hw, block_c, dev)
        part_dyx = torch.empty(batch, n_splits, n_ch, device=dev, dtype=torch.float32)
        part_dy = torch.empty_like(part_dyx)
        warps = _warps(block_hw * block_c)
        _grn_reduce_kernel[(batch, n_splits, cdiv(n_ch, block_c))](
            dy, x, part_dyx, part_dy, hw, n_ch, rows_per_split, n_splits,
            SQUARE=False, BLOCK_HW=block_hw, BLOCK_C=block_c, num_warps=warps,
        )
        g = torch.empty(batch, n_ch, device=dev, dtype=torch.float32)
        dw_part = torch.empty(batch, n_ch, device=dev, dtype=torch.float32)
        db_part = torch.empty(batch, n_ch, device=dev, dtype=torch.float32)
        block_s, stats_c = _grn_stats_blocks(n_splits, n_ch)
        _grn_stats_bwd_kernel[(batch,)](
            part_dyx, part_dy, weight, gx, inv_denom, g, dw_part, db_part, n_ch, n_splits,
            BLOCK_S=block_s, BLOCK_C=stats_c, num_warps=4,
        )
        dx = torch.empty(x.shape, device=dev, dtype=x.dtype)
        _grn_apply_kernel[(batch, cdiv(hw, block_hw), cdiv(n_ch, block_c))](
            dy, x, scale, g, dx, hw, n_ch,
            HAS_B=True, BLOCK_HW=block_hw, BLOCK_C=block_c, num_warps=warps,
        )
        w_dtype, b_dtype = ctx.param_dtypes
        dw = dw_part.sum(0).reshape(1, 1, 1, n_ch).to(w_dtype) if ctx.needs_input_grad[1] else None
        db = db_part.sum(0).reshape(1, 1, 1, n_ch).to(b_dtype) if ctx.needs_input_grad[2] else None
        return dx, dw, db, None


def grn(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-6) -> Tensor:
    """ConvNeXt-V2 GRN on channels-last ``x`` [B, H, W, C]; ``weight``, ``bias`` [1, 1, 1, C].

    Same numbers as ``pretrain.model.gen_vision.GlobalResponseNorm``; output dtype follows torch
    promotion of ``x``, ``weight`` and ``bias``, contiguous. Triton or reference per ``fused_kernels.dispatch``.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be channels-last [B, H, W, C], got shape {tuple(x.shape)}")
    n_ch = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p.numel() != n_ch:
            raise ValueError(f"{name} must hold {n_ch} values ([1, 1, 1, C]), got shape {tuple(p.shape)}")
    fallback = reference_for("grn", x, reference.grn_reference, fits=x.numel() > 0 and x[0].numel() < 2**31)
    if fallback is not None:
        return fallback(x, weight, bias, eps)
    return _GRNFunction.apply(x, weight, bias, eps)
