"""The three JanusFlow training objectives (paper Sec. 3.4) as pure functions of tensors.

* ``L_AR``   next-token cross-entropy on the response tokens of understanding / text samples;
* ``L_RF``   rectified-flow velocity regression on generation samples (``z_t``, target and the
             logit-normal time sampler live here too);
* ``L_REPA`` negative cosine similarity between the projected LLM features of a generation sample
             and the (stop-gradient) understanding-encoder features of its clean image.

Nothing here holds state or talks to a process group: the trainer gathers the counts, this module
only does arithmetic on the tensors it is given.

Reduction contract: sum, then normalise by the GLOBAL count
-----------------------------------------------------------
Every objective returns a :class:`LossTerm` ``(total, count)``: ``total`` is a differentiable float32
scalar that is the SUM of the objective over the units of this micro-batch, ``count`` is how many
units were summed. The unit of each objective:

==========  =========================  =============================================================
objective   unit                       per-unit value
==========  =========================  =============================================================
``L_AR``    one target (response)      ``-log p(label)``
            token
``L_RF``    one generation sample      mean over the ``C*H*W`` latent elements of ``(v - target)^2``
``L_REPA``  one generation sample      ``-mean`` over the ``P`` patches of ``cos(proj, stop_grad(f))``
==========  =========================  =============================================================

The trainer then divides each ``total`` by the count summed over ALL micro-batches of the optimizer
step on ALL data-parallel ranks (:func:`combine_losses`). Why: a mean taken per micro-batch (or per
rank) and then averaged weights a token of a short micro-batch more than a token of a long one, so
the result would depend on how the packer split the step. Sum-then-divide-by-the-global-count gives
exactly the mean over the whole global batch, whatever the split into micro-batches and ranks, and
a micro-batch with no unit of some kind (e.g. no understanding tokens) simply contributes a zero sum.
The global counts must be known before the backward pass, so the trainer obtains them from the
batch metadata of the whole step (one all-reduce of a small integer vector), not from the forward.

The per-unit value of ``L_RF`` is a mean over latent elements (not a sum) so that its scale does not
depend on the latent resolution; the per-unit value of ``L_REPA`` is a mean over patches for the same
reason. Both are then summed over samples, so that every generation sample weighs the same.

All totals are computed in float32, whatever the dtype of the inputs.

Time convention (shared with ``pretrain.model.gen_vision``): ``t`` in ``[0, 1]``, ``t = 0`` is pure
noise, ``t = 1`` is data, ``z_t = t * x + (1 - t) * z0`` and the velocity target is ``x - z0``.

``z_t``, ``L_RF`` and ``L_REPA`` are computed by the ops of ``fused_kernels`` (``flow_interpolate``,
``rf_loss_per_sample``, ``repa_loss_per_sample``): fused Triton kernels on CUDA, their PyTorch
references elsewhere, as ``train.kernels`` picks (``fused_kernels.dispatch``). This module states what is
summed and counted; the kernels' tests check the arithmetic against the paper's formulas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fused_kernels import flow_interpolate, repa_loss_per_sample, rf_loss_per_sample

__all__ = [
    "LossTerm",
    "FlowEndpoints",
    "autoregressive_loss",
    "autoregressive_loss_per_document",
    "interpolate_flow",
    "rectified_flow_loss",
    "sample_logit_normal_t",
    "repa_loss",
    "draw_prompt_drop",
    "combine_losses",
]

Count = Union[Tensor, int, float]


class LossTerm(NamedTuple):
    """One objective on one micro-batch.

    total: differentiable float32 scalar, the SUM of the objective over the units of this micro-batch.
    count: number of units summed into ``total`` (a Python int here; the trainer may hold tensors).
    """

    total: Tensor
    count: Count


# --------------------------------------------------------------------------------------------------
# L_AR
# --------------------------------------------------------------------------------------------------


def autoregressive_loss(logits: Tensor, labels: Tensor) -> LossTerm:
    """Summed next-token cross-entropy over the target tokens of a micro-batch.

    Args:
        logits: ``[N, V]`` logits at the positions that predict a response token, any float dtype.
            The caller has already shifted (position ``i`` predicts token ``i + 1``) and kept only the
            response positions (Eq. 6 sums over ``x^res`` only), so every row counts.
        labels: ``[N]`` int64 token ids in ``[0, V)``.

    Returns:
        ``LossTerm(total, N)``; ``total = -sum_i log softmax(logits_i)[labels_i]`` computed in float32
        (bf16 log-softmax over a ~100k vocabulary loses several bits). With ``N == 0`` the total is a
        zero that is still connected to ``logits`` so that backward reaches every parameter (with zero
        gradients) and ranks never disagree on which parameters received a gradient.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must be [N={logits.shape[0]}], got shape {tuple(labels.shape)}")
    n = logits.shape[0]
    if n == 0:
        # A sum over zero rows is an exact 0 that keeps the graph (sum of an empty tensor has a grad_fn).
        return LossTerm(logits.float().sum(), 0)
    total = F.cross_entropy(logits.float(), labels, reduction="sum")
    return LossTerm(total, n)


def autoregressive_loss_per_document(logits: Tensor, labels: Tensor, doc_sizes: Tensor, num_documents: int) -> LossTerm:
    """L_AR with a document as the unit: each document's mean target-token cross-entropy, summed.

    ``doc_sizes`` [N]: for each target row, how many targets its document holds (so row i weighs
    ``1 / doc_sizes[i]``); ``num_documents``: documents with at least one target (the unit count).
    Divided by the global document count (``combine_losses``), it is the mean over the step's
    documents of their per-document means: an understanding answer of 5 tokens weighs as much as a
    text document of 4,000 (``loss.ar_normalisation: per_document``).
    """
    if logits.shape[0] == 0:
        return LossTerm(logits.float().sum(), 0)
    per_token = F.cross_entropy(logits.float(), labels, reduction="none")
    return LossTerm((per_token / doc_sizes.to(per_token.dtype)).sum(), num_documents)


# --------------------------------------------------------------------------------------------------
# L_RF
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlowEndpoints:
    """Both ends of the straight paths of a micro-batch's generation samples, kept for ``L_RF``.

    data: ``[B, C, H, W]`` clean latents ``x`` (t = 1); noise: ``z0`` (t = 0), same shape.
    The velocity target ``x - z0`` is never stored: :func:`rectified_flow_loss` reads both ends
    (the fused kernel forms the difference in registers).
    """

    data: Tensor
    noise: Tensor


def interpolate_flow(x: Tensor, z0: Tensor, t: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
    """Point on the straight path from noise to data: ``z_t = t * x + (1 - t) * z0`` (Eq. 3).

    Args:
        x: ``[B, ...]`` clean data (VAE latents, typically ``[B, C, H, W]``).
        z0: noise of the same shape as ``x``.
        t: ``[B]`` times in ``[0, 1]``, broadcast over the non-batch dimensions.
        out_dtype: dtype of ``z_t``; default torch promotion of ``x``, ``z0`` and ``t``.

    ``t = 0`` gives ``z0`` and ``t = 1`` gives ``x`` exactly. ``fused_kernels.flow_interpolate`` (one
    pass; the PyTorch reference where ``train.kernels`` picks it).
    """
    return flow_interpolate(x, z0, t, out_dtype)


def rectified_flow_loss(v_pred: Tensor, x: Tensor, z0: Tensor) -> LossTerm:
    """Summed rectified-flow loss (Eq. 7) over the generation samples of a micro-batch.

    Args:
        v_pred: ``[B, C, H, W]`` predicted velocity (any float dtype; differentiable).
        x, z0: ``[B, C, H, W]`` the data and noise that made ``z_t`` (:class:`FlowEndpoints`); the
            target ``x - z0`` is a constant (no gradient reaches ``x`` or ``z0``).

    Returns:
        ``LossTerm(total, B)`` with ``total = sum_b mean_{c,h,w} (v_pred - (x - z0))^2`` in float32.
        The per-sample mean over elements keeps the scale independent of the latent resolution; the
        sum over samples lets :func:`combine_losses` divide by the global number of samples.
        ``fused_kernels.rf_loss_per_sample`` computes the summands (fused: one read of ``v``, ``x``, ``z0``).
    """
    if v_pred.shape != x.shape:
        raise ValueError(f"v_pred and x must have the same shape, got {tuple(v_pred.shape)} and {tuple(x.shape)}")
    return LossTerm(rf_loss_per_sample(v_pred, x, z0).sum(), v_pred.shape[0])


def sample_logit_normal_t(
    n: int,
    generator: torch.Generator | None = None,
    mean: float = 0.0,
    std: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Draw ``n`` flow times from the logit-normal distribution of Stable Diffusion 3.

    ``t = sigmoid(u)`` with ``u ~ Normal(mean, std)``, so ``logit(t)`` is normal. With the default
    ``mean = 0, std = 1`` the density peaks at ``t = 0.5`` and thins out at both ends, where the
    velocity is easiest to predict.

    Returns:
        ``[n]`` tensor of ``dtype`` with values strictly inside ``(0, 1)``: the sigmoid is taken in
        float32 and, after casting, clamped to the open interval (``sigmoid`` saturates to exactly 0
        or 1 for large ``|u|`` and the generation encoder must never see a degenerate ``t``).
        ``device`` defaults to the generator's device (CPU without a generator).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    if device is None and generator is not None:
        device = generator.device
    u = torch.randn(n, generator=generator, device=device, dtype=torch.float32)
    t = torch.sigmoid(u * std + mean).to(dtype)
    info = torch.finfo(dtype)
    # 1 - eps/2 is the largest representable value below 1 in a binary float format.
    return t.clamp(min=info.tiny, max=1.0 - info.eps / 2)


# --------------------------------------------------------------------------------------------------
# L_REPA
# --------------------------------------------------------------------------------------------------


def repa_loss(projected: Tensor, target_features: Tensor) -> LossTerm:
    """Summed representation-alignment loss (Eq. 8) over the generation samples of a micro-batch.

    Args:
        projected: ``[B, P, D]`` LLM intermediate features of the noisy latent, projected by the REPA
            MLP ``h_phi`` to the understanding-encoder width ``D`` (``P = H_gen * W_gen`` patches).
        target_features: ``[B, P, D]`` understanding-encoder features ``f_enc(x^res)`` of the clean
            image. Detached here: the gradient must never reach the understanding encoder, whatever
            the caller did.

    Returns:
        ``LossTerm(total, B)`` with ``total = sum_b -mean_p cos(projected[b, p], target[b, p])`` in
        float32 (cosine along ``D``). The per-sample mean over patches keeps the scale independent of
        the grid size; the sum over samples lets :func:`combine_losses` divide by the global number
        of generation samples, like ``L_RF``. ``fused_kernels.repa_loss_per_sample`` computes the summands
        (fused cosine: no normalised copies; the PyTorch reference where ``train.kernels`` picks it).
    """
    if projected.dim() != 3:
        raise ValueError(f"projected must be [B, P, D], got shape {tuple(projected.shape)}")
    if target_features.shape != projected.shape:
        raise ValueError(
            f"target_features must match projected {tuple(projected.shape)}, "
            f"got {tuple(target_features.shape)}"
        )
    return LossTerm(repa_loss_per_sample(projected, target_features).sum(), projected.shape[0])


# --------------------------------------------------------------------------------------------------
# Classifier-free guidance and combination
# --------------------------------------------------------------------------------------------------


def draw_prompt_drop(
    n: int,
    prob: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Which of ``n`` generation prompts to drop (replace by the unconditional prompt) for CFG.

    Returns a ``[n]`` bool tensor, each entry independently ``True`` with probability ``prob``
    (the paper drops 10%). ``prob = 0`` never drops and ``prob = 1`` always drops.
    ``device`` defaults to the generator's device (CPU without a generator).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    if device is None and generator is not None:
        device = generator.device
    # torch.rand is in [0, 1): `< 0` is never true and `< 1` always is.
    return torch.rand(n, generator=generator, device=device) < prob


def _as_scale(global_count: Count, weight: float, grad_scale: float, like: Tensor) -> Tensor | float:
    """``weight * grad_scale / global_count``, or 0 when the global count is 0 (no unit anywhere)."""
    if isinstance(global_count, Tensor):
        # Stay on device (no host sync): the count may come straight from an all-reduce.
        gc = global_count.to(device=like.device, dtype=like.dtype)
        if gc.dim() != 0:
            raise ValueError(f"global count must be a scalar, got shape {tuple(gc.shape)}")
        safe = torch.where(gc > 0, gc, torch.ones_like(gc))
        return torch.where(gc > 0, weight * grad_scale / safe, torch.zeros_like(gc))
    if global_count < 0:
        raise ValueError(f"global count must be >= 0, got {global_count}")
    if global_count == 0:
        return 0.0
    return weight * grad_scale / global_count


def combine_losses(
    terms: Mapping[str, LossTerm],
    weights: Mapping[str, float],
    global_counts: Mapping[str, Count],
    grad_scale: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The scalar to backpropagate for one micro-batch, and detached per-term values for logging.

    ``loss = grad_scale * sum_k weight_k * total_k / global_count_k`` over the keys of ``terms``;
    ``weights`` and ``global_counts`` must hold every key of ``terms`` (extra keys are ignored, so one
    set of weights serves micro-batches that carry only some objectives). ``global_count_k`` is the
    number of units of objective ``k`` over ALL micro-batches of the optimizer step on ALL
    data-parallel ranks (see the module docstring). A term whose global count is 0 contributes
    ``0 * total_k``: nothing, but the graph stays connected so every parameter gets a (zero) gradient.

    ``grad_scale``: the sum over all micro-batches and ranks of ``weight * total / global_count`` is
    exactly the global-batch mean we want the gradient of. DeepSpeed's ``engine.backward`` multiplies
    the loss by ``1 / gradient_accumulation_steps`` and its gradient all-reduce AVERAGES over the
    ``dp_size`` data-parallel ranks, i.e. it applies an extra factor ``1 / (dp_size * grad_accum)``.
    The caller therefore passes ``grad_scale = dp_size * grad_accum_steps`` to cancel it. For a plain
    loop that sums ``.backward()`` over micro-batches on one process and all-reduces with SUM, pass
    ``grad_scale = 1``. Because of this factor the returned scalar is not a loss value to print; log
    the dict instead.

    Returns:
        ``(loss, logs)``: ``loss`` a float32 scalar carrying the graph; ``logs[k] = total_k /
        global_count_k`` detached, unweighted and not multiplied by ``grad_scale``, so that summing
        ``logs[k]`` over micro-batches and ranks gives the global-batch mean of objective ``k``.
    """
    if not terms:
        raise ValueError("combine_losses needs at least one term")
    missing = [k for k in terms if k not in weights or k not in global_counts]
    if missing:
        raise KeyError(f"terms {missing} need both a weight and a global count")
    loss: Tensor | None = None
    logs: dict[str, Tensor] = {}
    for name, term in terms.items():
        total = term.total.float()
        if total.dim() != 0:
            raise ValueError(f"term {name!r}: total must be a scalar, got shape {tuple(total.shape)}")
        scale = _as_scale(global_counts[name], float(weights[name]), float(grad_scale), total)
        contribution = total * scale
        loss = contribution if loss is None else loss + contribution
        unit_scale = _as_scale(global_counts[name], 1.0, 1.0, total)
        logs[name] = (total.detach() * unit_scale).detach()
    assert loss is not None
    return loss, logs
