"""JanusFlow as a ``TrainSpec``: SigLIP understanding, rectified-flow generation, REPA, one LLM.

Everything the trainer needs to know about JanusFlow is here: how a rank's pipeline stage is built
and initialised, how a loader batch becomes model inputs (flow time, noise and CFG prompt drop from
the micro-batch's generator; latents from the shards or the latent codec), which loss terms each
stage owns (L_AR and L_RF on the last stage, L_REPA on the stage of block ``repa.layer``), what
travels between pipeline stages, the FLOP model, and the sample grid.

Pipeline activations: ``(hidden [T,1,H], gen_skip [N,C,s,s], gen_t_emb [N,H])``. For a micro-batch
without generation documents the first stage sends empty views of the hidden states as skip and
time embedding (every floating-point activation must take part in the backward, or DeepSpeed's
pipeline engine has no gradient to send back); middle stages pass skip and time embedding on as
received.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from datacontract.format import Task

from ..convert.state import full_tensor_names
from ..data.batch import packing_metadata
from ..model.janusflow import JanusFlowModel, StageActivations
from ..model.latent_codec import build_latent_codec
from ..flops import Gradients, MatmulSizes, SequenceShape, sequence_flops
from ..recipe import Recipe
from ..runtime.layout import ParallelLayout
from ..step import batch_unit_counts, prepare_model_inputs, stage_loss_terms
from .stages import build_stage, load_full_state
from ..train.spec import Prepared, StageResult, TrainSpec

OBJECTIVES = ("ar", "rf", "repa")


def loss_weights(recipe: Recipe) -> dict[str, float]:
    return {"ar": recipe.loss.ar_weight, "rf": recipe.loss.rf_weight, "repa": recipe.loss.repa_weight}


def build_model(recipe: Recipe, layout: ParallelLayout, log: Callable[[str], None]) -> JanusFlowModel:
    return build_stage(JanusFlowModel, recipe, layout, log)


def read_checkpoint_weights(root, tag: str, recipe: Recipe) -> dict[str, torch.Tensor]:
    from ..train.offline_weights import checkpoint_weights

    return checkpoint_weights(root, tag, recipe.model, "raw")


class LazyCodec:
    """The latent codec, built on first use: a run whose shards carry precomputed latents never
    loads the SDXL-VAE for training (only a sample grid that decodes does)."""

    def __init__(self, recipe: Recipe, device: torch.device) -> None:
        self.recipe, self.device = recipe, device
        self._codec = None

    @property
    def available(self) -> bool:
        g = self.recipe.model.gen_vision
        return g.latent_codec == "space_to_depth" or self.recipe.init.vae is not None

    def _get(self):
        if self._codec is None:
            self._codec = build_latent_codec(self.recipe.model, self.recipe.init.vae, self.device)
        return self._codec

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._get().encode(pixels)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._get().decode(latents)


class JanusFlowStep:
    """JanusFlow's ``ModelStep`` (see ``pretrain.train.spec``)."""

    def __init__(self, recipe: Recipe, layout: ParallelLayout) -> None:
        self.recipe, self.layout = recipe, layout
        self.codec = LazyCodec(recipe, layout.device)
        # The planner's FLOP model (LLM, attention per document, SigLIP, generation modules, REPA).
        self.flop_sizes = MatmulSizes.from_config(recipe.model)
        self.flop_grads = Gradients.for_trainable(recipe.train.trainable)

    # host-side accounting --------------------------------------------------------------------
    def unit_counts(self, batch) -> dict[str, int]:
        return batch_unit_counts(batch, self.recipe.loss.ar_normalisation)

    def flops(self, batch) -> float:
        return float(sum(sequence_flops(self.recipe.model, self.flop_sizes, self.flop_grads,
                                        SequenceShape.from_batch(batch)).values()))

    def task_counts(self, batch) -> dict[str, int]:
        per_task = packing_metadata(batch).task_docs or tuple(
            batch.doc_tasks.tolist().count(int(task)) for task in Task)  # batches without task facts
        return {task.name.lower(): int(per_task[int(task)]) for task in Task}

    # device work -----------------------------------------------------------------------------
    def clean_latents(self, batch) -> Optional[torch.Tensor]:
        """Scaled latents x of the micro-batch's generation images (data at t = 1)."""
        latents = batch.gen_latents
        if latents is None and batch.gen_pixels is not None and len(batch.gen_pixels):
            if not self.codec.available:
                raise RuntimeError(
                    "generation documents without precomputed latents: set init.vae to a local SDXL-VAE "
                    "folder, or build the shards with data_tools --vae"
                )
            latents = self.codec.encode(batch.gen_pixels)
        return None if latents is None else latents * self.recipe.model.gen_vision.latent_scale

    def prepare(self, batch, generator: torch.Generator) -> Prepared:
        loss = self.recipe.loss
        inputs, target = prepare_model_inputs(batch, self.clean_latents(batch), self.recipe.data.prompt_drop_prob,
                                              generator, time_mean=loss.rf_time_mean, time_std=loss.rf_time_std)
        return Prepared(inputs, target)

    def forward(self, model: nn.Module, prepared: Prepared, received: Optional[tuple]) -> StageResult:
        inputs, layout = prepared.inputs, self.layout
        gen_skip = gen_t_emb = None
        if received is None:
            activations, outputs = model(inputs)
        else:
            hidden, gen_skip, gen_t_emb = received
            n_gen = 0 if inputs.gen_z_t is None else len(inputs.gen_z_t)
            stage_input = StageActivations(hidden, gen_skip if n_gen else None, gen_t_emb if n_gen else None)
            activations, outputs = model(inputs, stage_input)
        terms = stage_loss_terms(outputs, prepared.targets, inputs.packing(), self.recipe.loss.ar_normalisation)
        if layout.is_last_stage:
            send = None
        elif layout.is_first_stage:
            send = self._first_stage_activations(activations)
        else:  # a middle stage passes skip and time embedding on as received (empty or not)
            send = (activations.hidden, gen_skip, gen_t_emb)
        return StageResult(send, terms)

    def _first_stage_activations(self, activations: StageActivations) -> tuple[torch.Tensor, ...]:
        hidden = activations.hidden
        if activations.gen_skip is not None:
            return hidden, activations.gen_skip, activations.gen_t_emb
        # Empty views of the hidden states: part of the graph, so the backward accepts their gradients.
        g = self.recipe.model.gen_vision
        side = g.latent_size // g.patch_size
        empty = hidden.reshape(-1)[:0]
        return hidden, empty.reshape(0, g.channels, side, side), empty.reshape(0, hidden.shape[-1])


def build_step(recipe: Recipe, layout: ParallelLayout) -> JanusFlowStep:
    return JanusFlowStep(recipe, layout)


def build_sample_grid(recipe: Recipe, layout: ParallelLayout, step: JanusFlowStep, log: Callable[[str], None]):
    from ..train.image_grid import SampleGrid

    return SampleGrid(recipe, step.codec if step.codec.available else None, layout, log=log)


JANUSFLOW = TrainSpec(
    name="janusflow",
    objectives=OBJECTIVES,
    loss_weights=loss_weights,
    build_model=build_model,
    load_full_state=load_full_state,
    read_checkpoint_weights=read_checkpoint_weights,
    full_tensor_names=full_tensor_names,
    build_step=build_step,
    build_sample_grid=build_sample_grid,
)
