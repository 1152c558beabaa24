"""Janus-Pro as a ``TrainSpec``: SigLIP understanding, autoregressive generation of image codes, one LLM.

Everything the trainer needs to know about Janus-Pro is here: how a rank's pipeline stage is built
and initialised (``init.januspro``, or ``init.llm`` / ``init.siglip`` for stage 1), how a loader batch
becomes model inputs (the CFG prompt drop, drawn from the micro-batch's generator), which loss terms
the last stage owns (``ar``: next-token cross-entropy at the text targets, under
``loss.ar_normalisation`` as for JanusFlow; ``image``: cross-entropy of the image head at every
image-code target; both summed in float32 and normalised by their global counts), the FLOP model,
and the (empty, for now) sample grid.

CFG prompt drop (the released sampler's unconditional row, fixture README): the prompt tokens of a
dropped generation document (after its BOS, before its ``<begin_of_image>``) are replaced by the pad
id and stay attended to, positions unchanged. The draw is one Bernoulli per generation document from
the micro-batch's generator, which the trainer keys by the micro-batch's rows as for JanusFlow.

Pipeline activations: ``(hidden [T, 1, H],)``. A micro-batch without understanding images or image
codes still gives every trainable parameter a (zero) gradient (``JanusProModel`` adds
``parts.zero_touch`` of its unused branches), so gradient buckets match on every rank.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from torch import nn

from ..convert.state import full_tensor_names, load_model_state
from ..data.batch import packing_metadata
from ..flops import Gradients, MatmulSizes, SequenceShape, sequence_flops
from ..losses import LossTerm, autoregressive_loss, draw_prompt_drop
from ..model.januspro import JanusProInputs, JanusProModel
from ..recipe import Recipe
from ..runtime.layout import ParallelLayout
from ..runtime.mpu import megatron_process_groups
from ..step import ar_loss_term, ar_unit_count, hide_dropped_prompts
from ..train.spec import Prepared, StageResult, TrainSpec
from .janusflow import JanusFlowStep, read_checkpoint_weights

OBJECTIVES = ("ar", "image")
# Synthetic batches (``data.root: null``) hold random token ids and have no tokenizer: any id serves
# as their pad.
SYNTHETIC_PAD_ID = 0


def loss_weights(recipe: Recipe) -> dict[str, float]:
    return {"ar": recipe.loss.ar_weight, "image": recipe.loss.image_weight}


def build_model(recipe: Recipe, layout: ParallelLayout, log: Callable[[str], None]) -> JanusProModel:
    from ..train.init_weights import load_initial_weights

    model = JanusProModel(recipe.model, layout.is_first_stage, layout.is_last_stage,
                          process_groups=megatron_process_groups(layout))
    for line in load_initial_weights(model, recipe.init, layout):
        log(line)
    model.set_trainable(recipe.train.trainable)
    return model


def load_full_state(model: nn.Module, state: Mapping[str, torch.Tensor], layout: ParallelLayout) -> None:
    load_model_state(model, state, layout=layout)


def pad_id_for(recipe: Recipe) -> int:
    """The pad id the CFG prompt drop writes: the shards' (``layout.pad_id`` in their manifest, the
    tokenizer's pad token), or ``SYNTHETIC_PAD_ID`` for synthetic batches."""
    if recipe.data.root is None:
        return SYNTHETIC_PAD_ID
    from datacontract.shards import read_manifest

    pad_id = (read_manifest(recipe.data.root).get("layout") or {}).get("pad_id")
    if pad_id is None and recipe.data.prompt_drop_prob > 0:
        raise ValueError(
            f"data.root={recipe.data.root}: the shards record no pad id (layout.pad_id), which Janus-Pro's "
            "CFG prompt drop writes; rebuild them with data_tools for model.family januspro, or set "
            "data.prompt_drop_prob=0"
        )
    return SYNTHETIC_PAD_ID if pad_id is None else int(pad_id)


def drop_prompts(input_ids: torch.Tensor, meta, prompt_drop_prob: float, pad_id: int,
                 generator: torch.Generator) -> torch.Tensor:
    """``input_ids`` with the prompts of the dropped generation documents replaced by ``pad_id``
    (one draw per generation document from ``generator``, on the CPU; no host read)."""
    dropped = draw_prompt_drop(meta.num_gen, prompt_drop_prob, generator=generator)
    # hide_dropped_prompts marks the same tokens JanusFlow hides; Janus-Pro overwrites them instead.
    prompt = hide_dropped_prompts(None, None, dropped, meta).to(input_ids.device)
    return torch.where(prompt, torch.full_like(input_ids, pad_id), input_ids)


class JanusProStep:
    """Janus-Pro's ``ModelStep`` (see ``pretrain.train.spec``)."""

    # Documents per task from the batch's metadata: the same rule as JanusFlow's (no model state).
    task_counts = JanusFlowStep.task_counts

    def __init__(self, recipe: Recipe, layout: ParallelLayout) -> None:
        self.recipe, self.layout = recipe, layout
        self.pad_id = pad_id_for(recipe)
        self.flop_sizes = MatmulSizes.from_config(recipe.model)
        self.flop_grads = Gradients.for_trainable(recipe.train.trainable, "januspro")

    # host-side accounting --------------------------------------------------------------------
    def unit_counts(self, batch) -> dict[str, int]:
        """'ar': text targets (understanding answers, text), or their documents under
        ``loss.ar_normalisation: per_document``; 'image': image-code targets."""
        meta = packing_metadata(batch)
        return {"ar": ar_unit_count(meta, self.recipe.loss.ar_normalisation),
                "image": int(meta.gen_code_positions.shape[0])}

    def flops(self, batch) -> float:
        return float(sum(sequence_flops(self.recipe.model, self.flop_sizes, self.flop_grads,
                                        SequenceShape.from_batch(batch)).values()))

    # device work -----------------------------------------------------------------------------
    def prepare(self, batch, generator: torch.Generator) -> Prepared:
        meta = packing_metadata(batch)
        input_ids = batch.input_ids
        if meta.num_gen:
            input_ids = drop_prompts(input_ids, meta, self.recipe.data.prompt_drop_prob, self.pad_id, generator)
        # Janus-Pro's understanding images have no UND_IMAGE_BEGIN slot (a plain <begin_of_image>), so
        # count their feature slots, not their begin tokens.
        und_pixels = batch.und_pixels if meta.und_positions.numel() else None
        return Prepared(JanusProInputs(input_ids, batch.position_ids, batch.cu_seqlens, batch.token_kind,
                                       batch.target_mask, und_pixels, meta))

    def forward(self, model: nn.Module, prepared: Prepared, received: Optional[tuple]) -> StageResult:
        inputs = prepared.inputs
        hidden, outputs = model(inputs, None if received is None else received[0])
        terms: dict[str, LossTerm] = {}
        if outputs.logits is not None:
            terms["ar"] = ar_loss_term(outputs.logits, outputs.labels, inputs.packing(),
                                       self.recipe.loss.ar_normalisation)
        if outputs.image_logits is not None:
            terms["image"] = autoregressive_loss(outputs.image_logits, outputs.image_labels)
        return StageResult(None if hidden is None else (hidden,), terms)


def build_step(recipe: Recipe, layout: ParallelLayout) -> JanusProStep:
    return JanusProStep(recipe, layout)


class NoSampleGrid:
    """Janus-Pro runs log no periodic sample grid yet (``train.image_interval`` is ignored)."""

    enabled = False

    def __init__(self, recipe: Recipe, log: Callable[[str], None]) -> None:
        if recipe.train.image_interval and recipe.train.image_interval <= recipe.optim.steps:
            log("train.image_interval: no sample grid for model.family januspro yet (use python -m pretrain.sample)")

    def maybe_log(self, step, model, ema, monitor) -> None:
        return None


def build_sample_grid(recipe: Recipe, layout: ParallelLayout, step: JanusProStep, log: Callable[[str], None]):
    return NoSampleGrid(recipe, log)


JANUSPRO = TrainSpec(
    name="januspro",
    objectives=OBJECTIVES,
    loss_weights=loss_weights,
    build_model=build_model,
    load_full_state=load_full_state,
    read_checkpoint_weights=read_checkpoint_weights,
    full_tensor_names=full_tensor_names,
    build_step=build_step,
    build_sample_grid=build_sample_grid,
)
