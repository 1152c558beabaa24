"""The mixed understanding / generation / text step: from a model-ready batch to the loss terms.

This is the one place that knows how JanusFlow's three objectives meet a packed batch; a trainer
calls ``prepare_model_inputs`` then the model, then ``stage_loss_terms``, and combines the terms with
``pretrain.losses.combine_losses``. Random draws (flow time, noise, CFG prompt drop) come from an
explicit generator so a step is reproducible from (seed, step, micro-step, rank).
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch

from .data.format import TokenKind
from .losses import (
    LossTerm,
    autoregressive_loss,
    draw_prompt_drop,
    interpolate_flow,
    rectified_flow_loss,
    repa_loss,
    sample_logit_normal_t,
)
from .model.janusflow import ModelInputs, ModelOutputs, target_flags


class BatchLike(Protocol):
    """What the loader hands the step (see ``pretrain.data.format`` for the layout)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    token_kind: torch.Tensor
    target_mask: torch.Tensor
    und_pixels: Optional[torch.Tensor]
    gen_pixels: Optional[torch.Tensor]


def hide_dropped_prompts(token_kind: torch.Tensor, cu_seqlens: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """Bool [T]: the prompt tokens (after BOS, before the time token) of generation documents whose
    prompt is dropped for classifier-free guidance. ``dropped`` has one entry per time token, in order.

    The released sampler's unconditional row keeps BOS and masks the rest of the prompt while keeping
    positions; hiding the same keys in training makes the two agree.
    """
    hidden = torch.zeros_like(token_kind, dtype=torch.bool)
    time_positions = torch.nonzero(token_kind == TokenKind.GEN_TIME).squeeze(1)
    if len(time_positions) != len(dropped):
        raise ValueError(f"{len(time_positions)} generation documents but {len(dropped)} drop decisions")
    doc_starts = cu_seqlens[:-1].long()
    for time_pos, drop in zip(time_positions.tolist(), dropped.tolist()):
        if drop:
            start = int(doc_starts[doc_starts <= time_pos].max())
            hidden[start + 1 : time_pos] = True
    return hidden


def prepare_model_inputs(
    batch: BatchLike,
    clean_latents: Optional[torch.Tensor],
    prompt_drop_prob: float,
    generator: torch.Generator,
    with_repa: bool = True,
) -> tuple[ModelInputs, Optional[torch.Tensor]]:
    """Draw t ~ logit-normal, noise and the CFG drop; return the model inputs and the velocity target.

    clean_latents: [N_gen, C, S, S] scaled VAE latents of the generation images (x, data at t = 1).
    """
    n_gen = int((batch.token_kind == TokenKind.GEN_TIME).sum())
    z_t = t = target = None
    hidden = None
    if n_gen:
        if clean_latents is None or len(clean_latents) != n_gen:
            raise ValueError(f"batch has {n_gen} generation documents but no matching latents")
        # Drawn on the generator's device (the CPU) and then moved: the same numbers on any device.
        device = clean_latents.device
        t = sample_logit_normal_t(n_gen, generator=generator).to(device)
        z0 = torch.randn(clean_latents.shape, generator=generator, dtype=torch.float32).to(device)
        z_t, target = interpolate_flow(clean_latents.float(), z0, t)
        dropped = draw_prompt_drop(n_gen, prompt_drop_prob, generator=generator).to(device)
        hidden = hide_dropped_prompts(batch.token_kind, batch.cu_seqlens, dropped)
    inputs = ModelInputs(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        cu_seqlens=batch.cu_seqlens,
        token_kind=batch.token_kind,
        hidden_keys=hidden,
        target_mask=batch.target_mask,
        und_pixels=batch.und_pixels,
        gen_z_t=z_t,
        gen_t=t,
        repa_pixels=batch.gen_pixels if (with_repa and n_gen) else None,
    )
    return inputs, target


def stage_loss_terms(outputs: ModelOutputs, velocity_target: Optional[torch.Tensor]) -> dict[str, LossTerm]:
    """The loss terms this pipeline stage owns: 'ar' and 'rf' on the last stage, 'repa' on the stage
    of the REPA layer. Missing objectives are simply absent (their global count decides the rest)."""
    terms: dict[str, LossTerm] = {}
    if outputs.logits is not None:
        terms["ar"] = autoregressive_loss(outputs.logits, outputs.labels)
    if outputs.velocity is not None:
        terms["rf"] = rectified_flow_loss(outputs.velocity, velocity_target)
    if outputs.repa_projected is not None:
        terms["repa"] = repa_loss(outputs.repa_projected, outputs.repa_target)
    return terms


def batch_unit_counts(batch: BatchLike) -> dict[str, int]:
    """Units of each objective in a batch, known before the forward (for the global counts)."""
    n_gen = int((batch.token_kind == TokenKind.GEN_TIME).sum())
    return {"ar": int(target_flags(batch.target_mask, batch.cu_seqlens).sum()), "rf": n_gen, "repa": n_gen}
