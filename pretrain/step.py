"""The mixed understanding / generation / text step: from a model-ready batch to the loss terms.

This is the one place that knows how JanusFlow's three objectives meet a packed batch; a trainer
calls ``prepare_model_inputs`` then the model, then ``stage_loss_terms``, and combines the terms with
``pretrain.losses.combine_losses``. Random draws (flow time, noise, CFG prompt drop) come from an
explicit generator so a step is reproducible from (seed, step, micro-step, rank).

No host round trip: counts, positions and lengths come from the batch's host-side
``PackingMetadata`` (built by the loader's collate; built from the tensors for other batches), and
the draws are made on the CPU generator, so nothing here reads a device tensor back.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch

from .data.batch import PackingMetadata, packing_metadata
from .losses import (
    FlowEndpoints,
    LossTerm,
    autoregressive_loss,
    autoregressive_loss_per_document,
    draw_prompt_drop,
    interpolate_flow,
    rectified_flow_loss,
    repa_loss,
    sample_logit_normal_t,
)
from .model.janusflow import ModelInputs, ModelOutputs


class BatchLike(Protocol):
    """What the loader hands the step (see ``datacontract.format`` for the layout)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    token_kind: torch.Tensor
    target_mask: torch.Tensor
    und_pixels: Optional[torch.Tensor]
    gen_pixels: Optional[torch.Tensor]
    # optional: ``metadata: PackingMetadata`` (host-side; built from the tensors when absent)


def hide_dropped_prompts(
    token_kind: torch.Tensor,
    cu_seqlens: torch.Tensor,
    dropped: torch.Tensor,
    metadata: Optional[PackingMetadata] = None,
) -> torch.Tensor:
    """Bool [T] on ``dropped``'s device: the prompt tokens (after BOS, before the time token) of
    generation documents whose prompt is dropped for classifier-free guidance. ``dropped`` has one
    entry per time token, in order. Without ``metadata`` it is built from the tensors (a host read).

    The released sampler's unconditional row keeps BOS and masks the rest of the prompt while keeping
    positions; hiding the same keys in training makes the two agree.
    """
    meta = metadata if metadata is not None else PackingMetadata.from_tensors(cu_seqlens, token_kind, None)
    if len(dropped) != meta.num_gen:
        raise ValueError(f"{meta.num_gen} generation documents but {len(dropped)} drop decisions")
    # One gather, no read back: entry num_gen (tokens outside any prompt) is never dropped.
    drop_or_keep = torch.cat([dropped.bool(), dropped.new_zeros(1, dtype=torch.bool)])
    return drop_or_keep[meta.prompt_owner.to(dropped.device)]


def prepare_model_inputs(
    batch: BatchLike,
    clean_latents: Optional[torch.Tensor],
    prompt_drop_prob: float,
    generator: torch.Generator,
    with_repa: bool = True,
    time_mean: float = 0.0,
    time_std: float = 1.0,
) -> tuple[ModelInputs, Optional[FlowEndpoints]]:
    """Draw t ~ logit-normal(``time_mean``, ``time_std``), noise and the CFG drop; return the model
    inputs and the flow's :class:`FlowEndpoints` (data and noise, for ``L_RF``; the velocity target is
    never formed).

    clean_latents: [N_gen, C, S, S] scaled VAE latents of the generation images (x, data at t = 1).
    The draws are made on ``generator``'s device (the CPU) and moved to the latents' device; the
    hidden-prompt mask is built on the CPU too and moved once.
    """
    meta = packing_metadata(batch)
    n_gen = meta.num_gen
    z_t = t = endpoints = None
    hidden = None
    if n_gen:
        if clean_latents is None or len(clean_latents) != n_gen:
            raise ValueError(f"batch has {n_gen} generation documents but no matching latents")
        # Drawn on the generator's device (the CPU) and then moved: the same numbers on any device.
        device = clean_latents.device
        t = sample_logit_normal_t(n_gen, generator=generator, mean=time_mean, std=time_std).to(device)
        z0 = torch.randn(clean_latents.shape, generator=generator, dtype=torch.float32).to(device)
        x = clean_latents.float()
        z_t, endpoints = interpolate_flow(x, z0, t), FlowEndpoints(x, z0)
        dropped = draw_prompt_drop(n_gen, prompt_drop_prob, generator=generator)
        hidden = hide_dropped_prompts(batch.token_kind, batch.cu_seqlens, dropped, meta).to(device)
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
        metadata=meta,
    )
    return inputs, endpoints


AR_NORMALISATIONS = ("pooled_tokens", "per_document")


def ar_loss_term(logits: torch.Tensor, labels: torch.Tensor, meta: PackingMetadata, normalisation: str) -> LossTerm:
    """L_AR of one micro-batch under ``loss.ar_normalisation`` (both families use it): ``pooled_tokens``,
    a target token is the unit; ``per_document``, a document is (its targets' mean)."""
    if normalisation == "pooled_tokens":
        return autoregressive_loss(logits, labels)
    if normalisation == "per_document":
        sizes = meta.on(logits.device)["ar_target_doc_sizes"]
        return autoregressive_loss_per_document(logits, labels, sizes, meta.num_ar_documents)
    raise ValueError(f"loss.ar_normalisation: unknown {normalisation!r}; one of {', '.join(AR_NORMALISATIONS)}")


def ar_unit_count(meta: PackingMetadata, normalisation: str) -> int:
    """Units of L_AR in a micro-batch, before the forward (host-side)."""
    return meta.num_ar_documents if normalisation == "per_document" else meta.num_ar_targets


def stage_loss_terms(
    outputs: ModelOutputs,
    endpoints: Optional[FlowEndpoints],
    meta: Optional[PackingMetadata] = None,
    ar_normalisation: str = "pooled_tokens",
) -> dict[str, LossTerm]:
    """The loss terms this pipeline stage owns: 'ar' and 'rf' on the last stage, 'repa' on the stage
    of the REPA layer. Missing objectives are simply absent (their global count decides the rest).
    ``meta`` (the micro-batch's packing) is needed for ``per_document`` L_AR."""
    terms: dict[str, LossTerm] = {}
    if outputs.logits is not None:
        terms["ar"] = ar_loss_term(outputs.logits, outputs.labels, meta, ar_normalisation)
    if outputs.velocity is not None:
        terms["rf"] = rectified_flow_loss(outputs.velocity, endpoints.data, endpoints.noise)
    if outputs.repa_projected is not None:
        terms["repa"] = repa_loss(outputs.repa_projected, outputs.repa_target)
    return terms


def batch_unit_counts(batch: BatchLike, ar_normalisation: str = "pooled_tokens") -> dict[str, int]:
    """Units of each objective in a batch, known before the forward (for the global counts): python
    ints from the host-side metadata, no device read."""
    meta = packing_metadata(batch)
    return {"ar": ar_unit_count(meta, ar_normalisation), "rf": meta.num_gen, "repa": meta.num_gen}
