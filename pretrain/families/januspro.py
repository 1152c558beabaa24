"""Janus-Pro as a ``TrainSpec``: SigLIP understanding, autoregressive generation of image codes, one LLM.

Everything the trainer needs to know about Janus-Pro is here: how a rank's pipeline stage is built
and initialised (``init.januspro``, or ``init.llm`` / ``init.siglip`` for stage 1), how a loader batch
becomes model inputs (the CFG prompt drop, drawn from the micro-batch's generator), which loss terms
the last stage owns (``ar``: next-token cross-entropy at the text targets, under
``loss.ar_normalisation`` as for JanusFlow; ``image``: cross-entropy of the image head at every
image-code target; both summed in float32 and normalised by their global counts), the FLOP model,
and the periodic sample grid (``CodeGridSampler``: codes drawn with CFG, decoded by the
shards' image codec; pipeline_parallel 1 only).

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

from ..convert.state import full_tensor_names
from ..data.batch import packing_metadata
from ..flops import Gradients, MatmulSizes, SequenceShape, sequence_flops
from ..losses import LossTerm, autoregressive_loss, draw_prompt_drop
from ..model.januspro import JanusProInputs, JanusProModel
from ..recipe import Recipe
from ..runtime.layout import ParallelLayout
from ..step import ar_loss_term, ar_unit_count, hide_dropped_prompts
from .stages import build_stage, load_full_state
from ..train.spec import Prepared, StageResult, TrainSpec
from .janusflow import JanusFlowStep, read_checkpoint_weights

OBJECTIVES = ("ar", "image")
# Synthetic batches (``data.root: null``) hold random token ids and have no tokenizer: any id serves
# as their pad.
SYNTHETIC_PAD_ID = 0


def loss_weights(recipe: Recipe) -> dict[str, float]:
    return {"ar": recipe.loss.ar_weight, "image": recipe.loss.image_weight}


def build_model(recipe: Recipe, layout: ParallelLayout, log: Callable[[str], None]) -> JanusProModel:
    return build_stage(JanusProModel, recipe, layout, log)


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


class CodeGridSampler:
    """Janus-Pro's ``GridSampler`` (``pretrain.train.image_grid``): image codes drawn by next-code
    prediction (``pretrain.sample.januspro.sample_codes``: CFG ``train.image_cfg_weight`` on the
    logits, temperature 1, KV cache, one generator per prompt seeded ``train.seed + i``, so every grid
    draws the same way), decoded by the image codec the shards were built with, with the released
    uint8 post-processing (``codes_to_uint8``), then to [0, 1]."""

    temperature = 1.0

    def __init__(self, recipe: Recipe, codec, grid: tuple[int, int], begin_of_image_id: int, pad_id: int) -> None:
        self.codec, self.grid = codec, grid
        self.begin_of_image_id, self.pad_id = int(begin_of_image_id), int(pad_id)
        self.cfg_weight, self.seed = recipe.train.image_cfg_weight, recipe.train.seed
        self.summary = (f"CFG w={self.cfg_weight:g} on logits, temperature {self.temperature:g}, "
                        f"{grid[0]}x{grid[1]} codes, {codec.describe()['kind']} decode")

    def sample(self, model: nn.Module, token_ids: list[list[int]]) -> torch.Tensor:
        from ..sample.januspro import sample_codes

        # The grid's prompts end where JanusFlow's time token goes; Janus-Pro's first code follows
        # <begin_of_image> (the generation document's layout).
        prompts = [list(ids) + [self.begin_of_image_id] for ids in token_ids]
        generators = [torch.Generator().manual_seed(self.seed + i) for i in range(len(prompts))]
        return sample_codes(model, prompts, self.grid[0] * self.grid[1], cfg_weight=self.cfg_weight,
                            temperature=self.temperature, pad_id=self.pad_id, generator=generators)

    def images(self, codes: torch.Tensor) -> torch.Tensor:
        from ..sample.januspro import codes_to_uint8

        return codes_to_uint8(self.codec, codes, self.grid).permute(0, 3, 1, 2).float() / 255.0


def grid_codec_path(recipe: Recipe, manifest: dict, kind: str) -> str:
    """Where the codec that built the shards lives: ``init.vq`` for VQ-16, else the path the build
    recorded (``config.codec_path`` of the manifest; a relative one may be relative to the shards)."""
    from pathlib import Path

    from ..train.image_grid import GridUnavailable

    if kind == "vq16":
        if recipe.init.vq is None:
            raise GridUnavailable("the codes are VQ-16's: set init.vq (the VQ-16 weights) to decode them")
        return recipe.init.vq
    recorded = (manifest.get("config") or {}).get("codec_path")
    if not recorded:
        raise GridUnavailable(f"the manifest of data.root={recipe.data.root} records no codec path (config.codec_path)")
    root = Path(recipe.data.root)
    candidates = [Path(recorded)] + ([] if Path(recorded).is_absolute() else [root / recorded])
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        raise GridUnavailable(f"the codec {recorded!r} recorded in the manifest of data.root={root} is not here")
    return str(found)


def make_code_grid_sampler(recipe: Recipe, layout: ParallelLayout, step: JanusProStep) -> CodeGridSampler:
    """The grid's sampler, or ``GridUnavailable`` saying why this run cannot have one."""
    from datacontract.shards import read_manifest
    from image_codecs import load_image_codec

    from ..train.image_grid import GridUnavailable

    if layout.pp_size > 1:
        raise GridUnavailable(
            f"parallel.pipeline_parallel={layout.pp_size}: Janus-Pro's sampler runs a whole single-stage model "
            "(sample a checkpoint with python -m pretrain.sample instead)"
        )
    if recipe.data.root is None:
        raise GridUnavailable("synthetic batches (data.root: null) have random codes and no image codec to decode with")
    manifest = read_manifest(recipe.data.root)
    described = (manifest.get("layout") or {}).get("image_codec")
    if not described:
        raise GridUnavailable(f"the manifest of data.root={recipe.data.root} records no image codec (layout.image_codec)")
    path = grid_codec_path(recipe, manifest, described["kind"])
    try:
        codec = load_image_codec(described["kind"], path, layout.device)
    except (OSError, ValueError, KeyError) as err:
        raise GridUnavailable(f"the image codec at {path} does not load: {err}") from None
    if codec.describe() != described:
        raise GridUnavailable(f"the image codec at {path} is not the one the shards were built with "
                              f"(describe() {codec.describe()} != layout.image_codec {described})")
    side = int(manifest["layout"]["resolution"]) // codec.downsample
    begin = (manifest.get("special_tokens") or {}).get("begin_of_image_id")
    if begin is None:
        raise GridUnavailable(f"the manifest of data.root={recipe.data.root} records no special_tokens.begin_of_image_id")
    return CodeGridSampler(recipe, codec, (side, side), begin, step.pad_id)


def build_sample_grid(recipe: Recipe, layout: ParallelLayout, step: JanusProStep, log: Callable[[str], None]):
    from ..train.image_grid import SampleGrid

    return SampleGrid(recipe, None, layout, log=log, make_sampler=lambda: make_code_grid_sampler(recipe, layout, step))


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
