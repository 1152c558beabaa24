"""The periodic sample grid: every ``train.image_interval`` optimizer steps, images generated from
fixed prompts with the EMA weights (CFG ``train.image_cfg_weight``, ``train.image_euler_steps``
Euler steps) are tiled into one image and logged (TensorBoard and ``output_dir/samples/``).

Wiring (the trainer, on every rank)::

    grid = SampleGrid(recipe, codec, layout, log=trainer_log)
    ...after each optimizer step (step = steps completed so far):
    grid.maybe_log(step, model, ema, monitor)

The prompts and the starting noise are the same at every step, so successive grids show how the
same images change as training goes on.

- Prompts: with ``data.root`` set, ``train.image_prompts`` are tokenized once with the tokenizer
  that built the shards (their manifest records its path and the special token ids). Without
  ``data.root`` the trainer sees synthetic batches of random token ids and has no tokenizer: the
  grid then uses as many fixed prompts of random token ids (seeded, within the vocabulary), and its
  tag says so.
- Weights: the EMA averages are copied into the model for sampling, and the raw weights are put
  back bit for bit afterwards (so training continues exactly as without the grid).
- Ranks: sampling runs the whole model, so with tensor parallelism every rank of a model replica
  must sample together (the model's own collectives). Only data-parallel replica 0 samples (the
  other replicas hold the same weights and would only repeat the work), and only a monitor that
  records (rank 0's) gets the decoded grid. With pipeline parallelism the stages of the pipeline
  sample together (``pretrain.sample.pipelined``).
- Family: how images come out of the model is a small strategy the model family passes in
  (``GridSampler``: sample with the model, then turn the samples into pictures). By default it is
  JanusFlow's (``FlowGridSampler``: Euler steps of the rectified flow, then the latent codec); the
  trainer itself never names a family.
When the grid cannot be made (no tokenizer recorded, no decoder for the latents)
it says why once and stays off: a missing picture must never stop a training run.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from ..recipe import Recipe
from ..sample.decode import CodecDecoder, LatentDecoder, NonFiniteError, require_finite
from ..runtime.layout import ParallelLayout
from ..sample.pipelined import PipelinedModel
from ..sample.text_to_image import generation_prompt_ids, sample_latents

# Grid look: at most this many tiles per row, a border between tiles, and small images enlarged
# (nearest neighbour, integer factor) so a 32-pixel demo image is not a speck in TensorBoard.
GRID_COLUMNS = 4
BORDER_PIXELS = 2
BORDER_VALUE = 1.0  # white
MIN_TILE_SIDE = 128
# Captions (the prompt under each image): PIL's built-in bitmap font, this many pixels a line.
CAPTION_LINE_PIXELS = 12
CAPTION_MARGIN = 2
# Synthetic-data runs: prompt length of the random-token prompts (BOS + 6 tokens, like the
# generation documents of pretrain.synthetic) and the seed they are drawn from.
SYNTHETIC_PROMPT_LENGTH = 7
SYNTHETIC_PROMPT_SEED = 20_240_601

TAG_TEXT_PROMPTS = "samples/ema_prompts"
TAG_RANDOM_TOKEN_PROMPTS = "samples/ema_random_token_prompts"


class GridUnavailable(Exception):
    """Why this run cannot make a sample grid (logged once; the grid is then off)."""


@dataclass(frozen=True)
class GridPrompts:
    """Token ids of the fixed prompts (each starting with BOS), what each one says, and the tag."""

    token_ids: list[list[int]]
    labels: list[str]
    tag: str


def build_grid_prompts(recipe: Recipe) -> GridPrompts:
    """The grid's prompts for this recipe: tokenized text with shards, random tokens without."""
    if recipe.data.root is None:
        return synthetic_grid_prompts(recipe.model.llm.vocab_size, len(recipe.train.image_prompts), recipe.data.seed)
    return tokenized_grid_prompts(recipe.data.root, recipe.train.image_prompts, recipe.model.llm.vocab_size)


def synthetic_grid_prompts(vocab_size: int, count: int, seed: int = 0) -> GridPrompts:
    """Fixed prompts of random token ids: synthetic batches have no tokenizer, so no text exists
    to tokenize. The first token stands in for BOS (it is what guidance's unconditional rows keep)."""
    generator = torch.Generator().manual_seed(SYNTHETIC_PROMPT_SEED + seed)
    ids = torch.randint(0, vocab_size, (count, SYNTHETIC_PROMPT_LENGTH), generator=generator).tolist()
    return GridPrompts(ids, [f"random tokens {row}" for row in ids], TAG_RANDOM_TOKEN_PROMPTS)


def tokenized_grid_prompts(root: str, prompts: Sequence[str], vocab_size: int) -> GridPrompts:
    """``prompts`` tokenized with the tokenizer recorded in the manifest of the shards at ``root``."""
    from datacontract.shards import read_manifest

    try:
        manifest = read_manifest(root)
    except FileNotFoundError as err:
        raise GridUnavailable(str(err)) from None
    recorded = (manifest.get("config") or {}).get("tokenizer")
    if not recorded:
        raise GridUnavailable(f"the manifest of data.root={root} records no tokenizer (config.tokenizer)")
    # The build records the path as it was given; a relative one may be relative to the shards.
    candidates = [Path(recorded)] + ([] if Path(recorded).is_absolute() else [Path(root) / recorded])
    folder = next((c for c in candidates if c.is_dir()), None)
    if folder is None:
        raise GridUnavailable(
            f"the tokenizer {recorded!r} recorded in the manifest of data.root={root} is not a local folder here"
        )
    from datacontract.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(folder))
    bos_id = (manifest.get("special_tokens") or {}).get("bos_id", tokenizer.bos_token_id)
    if bos_id is None:
        raise GridUnavailable(f"the tokenizer {folder} defines no BOS token and the manifest records none")
    ids = [generation_prompt_ids(tokenizer, prompt, int(bos_id)) for prompt in prompts]
    too_large = max(max(row) for row in ids)
    if too_large >= vocab_size:
        raise GridUnavailable(f"the tokenizer {folder} gives token id {too_large} >= model.llm.vocab_size={vocab_size}")
    return GridPrompts(ids, list(prompts), TAG_TEXT_PROMPTS)


@contextlib.contextmanager
def ema_weights_swapped_in(model: nn.Module, averages: dict) -> Iterator[nn.Module]:
    """Inside the block the model holds the EMA ``averages`` ({name: float32 tensor shaped like the
    parameter}, ``EMA.full_averages``; cast to each parameter's dtype); on leaving, the raw weights
    are restored bit for bit.

    The raw weights wait on the CPU: a second copy of every trained parameter on the GPU could run
    out of memory in the middle of a run sized for training.
    """
    params = dict(model.named_parameters())
    unknown = [name for name in averages if name not in params]
    if unknown:
        raise KeyError(
            f"EMA parameters not in the model (pass the module the EMA was made from, not a wrapper): {unknown[:5]}"
        )
    raw = {name: params[name].detach().to("cpu", copy=True) for name in averages}
    try:
        with torch.no_grad():
            for name, average in averages.items():
                params[name].copy_(average)
        yield model
    finally:
        with torch.no_grad():
            for name, saved in raw.items():
                params[name].copy_(saved)  # same dtype both ways: an exact copy


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block; afterwards every submodule gets back its own mode (a frozen
    part may have been in eval mode while the rest trained)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def render_caption(text: str, width: int, lines: int) -> torch.Tensor:
    """[3, h, width] in [0, 1]: ``text`` in black on white, wrapped at word boundaries into at most
    ``lines`` lines (the last one cut with "..." when the text is longer), PIL's built-in font."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    line_height = CAPTION_LINE_PIXELS
    wrapped: list[str] = []
    for word in text.split():
        if wrapped and font.getlength(wrapped[-1] + " " + word) <= width - 2 * CAPTION_MARGIN:
            wrapped[-1] += " " + word
        else:
            wrapped.append(word)
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] += " ..."
    canvas = Image.new("RGB", (width, lines * line_height + CAPTION_MARGIN), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(wrapped):
        draw.text((CAPTION_MARGIN, CAPTION_MARGIN + i * line_height), line, fill=(0, 0, 0), font=font)
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).permute(2, 0, 1)


def _enlarge(images: torch.Tensor, min_tile_side: int) -> torch.Tensor:
    factor = max(1, min_tile_side // images.shape[2])
    return images.float().clamp(0, 1).repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def tile_images(
    images: torch.Tensor,
    columns: int = GRID_COLUMNS,
    border: int = BORDER_PIXELS,
    min_tile_side: int = MIN_TILE_SIDE,
    captions: Optional[Sequence[str]] = None,
    caption_lines: int = 3,
    caption_width: int = 0,
) -> torch.Tensor:
    """[B, 3, h, w] in [0, 1] -> one image [3, H, W] in [0, 1]: tiles in rows of ``columns``, left to
    right then top to bottom, ``border`` pixels of white around each, enlarged by the integer factor
    that makes a tile at least ``min_tile_side`` pixels high (when it is smaller).

    ``captions`` (one text per image): written under each image (``caption_lines`` lines as wide
    as the image), or beside it in a column ``caption_width`` pixels wide when that is > 0."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, h, w], got {tuple(images.shape)}")
    tiles = _enlarge(images, min_tile_side)
    if captions is not None:
        if len(captions) != len(images):
            raise ValueError(f"{len(captions)} captions for {len(images)} images")
        beside = caption_width > 0
        height, width = tiles.shape[2:]
        if beside:
            caption_lines = max(1, (height - CAPTION_MARGIN) // CAPTION_LINE_PIXELS)
        blocks = [render_caption(text, caption_width if beside else width, caption_lines) for text in captions]
        if beside:
            blocks = [torch.nn.functional.pad(b, (0, 0, 0, height - b.shape[1]), value=1.0) for b in blocks]
        tiles = torch.stack([torch.cat([tile, block], dim=2 if beside else 1) for tile, block in zip(tiles, blocks)])
    count, _, height, width = tiles.shape
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    canvas = torch.full((3, rows * (height + border) + border, columns * (width + border) + border), BORDER_VALUE)
    for i, tile in enumerate(tiles):
        top = border + (i // columns) * (height + border)
        left = border + (i % columns) * (width + border)
        canvas[:, top:top + height, left:left + width] = tile
    return canvas


class GridSampler(Protocol):
    """How a family makes the grid's pictures. ``summary``: how it samples, for the start message.
    ``sample(model, token_ids)`` runs on every rank of the replica (inside the EMA swap, eval mode and
    a forked random state) with the model stage of this rank; ``images(samples)`` -> [B, 3, h, w]
    in [0, 1] (CPU), only where the grid is recorded."""

    summary: str

    def sample(self, model: nn.Module, token_ids: list[list[int]]): ...

    def images(self, samples) -> torch.Tensor: ...


class FlowGridSampler:
    """JanusFlow's: ``steps`` Euler steps of the velocity with CFG ``cfg_weight`` from seeded noise
    (pipeline stages sample together), latents decoded by the latent codec."""

    def __init__(self, recipe: Recipe, codec, layout: ParallelLayout) -> None:
        if codec is None:
            raise GridUnavailable(
                "no decoder for the latents: model.gen_vision.latent_codec='sdxl_vae' needs init.vae "
                "(a local AutoencoderKL folder)"
            )
        train = recipe.train
        self.decode: LatentDecoder = CodecDecoder(codec, recipe.model.gen_vision.latent_scale)
        self.cfg_weight, self.euler_steps, self.noise_seed = train.image_cfg_weight, train.image_euler_steps, train.seed
        self.layout = layout
        self.summary = f"CFG w={self.cfg_weight:g}, {self.euler_steps} Euler steps"

    def sample(self, model: nn.Module, token_ids: list[list[int]]) -> torch.Tensor:
        whole = model.pre_process and model.post_process
        return sample_latents(
            model if whole else PipelinedModel(model, self.layout), token_ids, steps=self.euler_steps,
            cfg_weight=self.cfg_weight, generator=torch.Generator().manual_seed(self.noise_seed),
        )

    def images(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode(latents)


class SampleGrid:
    """Samples, tiles and logs the grid every ``recipe.train.image_interval`` steps (see the module
    docstring). ``codec``: the trainer's latent codec (``build_latent_codec``), reused to decode;
    None where latents cannot become images (SDXL-VAE latents without ``init.vae``). ``layout``:
    this process's ``ParallelLayout`` (None: a world of one). ``log``: where the one-time and per-grid messages go (the
    trainer's rank-0 logger). ``make_sampler``: the family's ``GridSampler`` factory (may raise
    ``GridUnavailable``; ``codec`` is then unused); None: ``FlowGridSampler`` with ``codec``."""

    def __init__(self, recipe: Recipe, codec, layout: Optional[ParallelLayout] = None,
                 log: Callable[[str], None] = print,
                 make_sampler: Optional[Callable[[], GridSampler]] = None) -> None:
        train = recipe.train
        self.interval = train.image_interval
        self.layout = layout or ParallelLayout.single()
        self.log = log
        self.prompts: Optional[GridPrompts] = None
        self.sampler: Optional[GridSampler] = None
        self.enabled = self.interval > 0
        if not self.enabled:
            return
        try:
            if recipe.parallel.zero_stage == 3:
                raise GridUnavailable("ZeRO-3 partitions the parameters, so no rank holds whole weights to sample with")
            self.sampler = make_sampler() if make_sampler else FlowGridSampler(recipe, codec, self.layout)
            self.prompts = build_grid_prompts(recipe)
        except GridUnavailable as why:
            self._disable(str(why))
            return
        synthetic = self.prompts.tag == TAG_RANDOM_TOKEN_PROMPTS
        self.log(
            f"sample grid every {self.interval} steps: {len(self.prompts.token_ids)} fixed prompts"
            + (" of random token ids (synthetic data has no tokenizer)" if synthetic else "")
            + f", EMA weights, {self.sampler.summary} -> TensorBoard "
            f"{self.prompts.tag!r} and {train.output_dir}/samples/"
            + ("" if synthetic else "; tiles left to right, top to bottom:")
        )
        if not synthetic:
            for i, label in enumerate(self.prompts.labels):
                self.log(f"  {i}: {label}")

    def _disable(self, why: str) -> None:
        if self.enabled:
            self.log(f"sample grid off (train.image_interval={self.interval}): {why}")
        self.enabled = False

    def due(self, step: int) -> bool:
        """Whether ``step`` (optimizer steps completed) gets a grid."""
        return self.enabled and step > 0 and step % self.interval == 0

    def maybe_log(self, step: int, model: nn.Module, ema, monitor) -> Optional[torch.Tensor]:
        """Call on every rank after every optimizer step with the same ``step``. When due, the ranks
        of data-parallel replica 0 sample together; a monitor that records gets the grid [3, H, W]
        through ``monitor.image(step, tag, grid)`` and it is returned; otherwise None."""
        if not self.due(step):
            return None
        # The EMA is sharded over the data-parallel ranks: all of them put the averages together.
        averages = ema.full_averages(self.layout.comm, self.layout.dp_group)
        if self.layout.dp_rank != 0:
            return None
        started = time.perf_counter()
        # Whether this rank is past the sampling's collectives: from there on what it does is its own.
        together = True
        try:
            samples = self._sample_together(model, averages)
            together = False
            grid = self._picture(samples, captioned=True) if monitor.records else None
            if grid is not None:
                monitor.image(step, self.prompts.tag, grid)
        except NonFiniteError as why:
            # A picture is a diagnostic: the run goes on (its own checks judge the weights), the grid
            # of this step is skipped and says why. The check follows the sampling's last collective,
            # so a rank that skips leaves no other rank waiting.
            self.log(f"sample grid of step {step} skipped: {why}")
            return None
        except Exception as err:
            # A decoder or picture that fails is no reason to end a run either. Not inside the
            # sampling of a replica of several ranks: a rank that went on training while its peers
            # still sample would pair its training collectives with their sampling ones.
            if together and self.layout.tp_size * self.layout.pp_size > 1:
                raise
            self.log(f"sample grid of step {step} failed ({type(err).__name__}: {err}); training goes on")
            return None
        if grid is not None:
            self.log(f"sample grid of step {step} in {time.perf_counter() - started:.1f}s")
        return grid

    def sample(self, model: nn.Module, ema, decode: bool = True, captioned: bool = False) -> Optional[torch.Tensor]:
        """The grid [3, H, W] in [0, 1] (CPU float32) from the EMA weights (an ``EMA`` of this process
        alone, or averages from ``EMA.full_averages``), with each text prompt under its image when
        ``captioned``; with ``decode=False`` only
        the sampling runs (a tensor-parallel peer's share of the collective work) and None is returned.
        The model's raw weights, train/eval modes and torch's random state are unchanged afterwards."""
        samples = self._sample_together(model, ema)
        return self._picture(samples, captioned) if decode else None

    def _sample_together(self, model: nn.Module, ema):
        """The sampling (collective across the replica's ranks), checked to be finite."""
        if self.prompts is None or self.sampler is None:
            raise RuntimeError("the sample grid is off for this run (see the message logged at start)")
        device = next(model.parameters()).device
        cuda_devices = [device] if device.type == "cuda" else []
        # The sampler draws from its own generators; fork_rng keeps any draw inside the model from
        # shifting the training's random stream (a resumed run must see the same draws).
        averages = ema if isinstance(ema, dict) else ema.full_averages()
        with torch.random.fork_rng(devices=cuda_devices), ema_weights_swapped_in(model, averages), eval_mode(model):
            samples = self.sampler.sample(model, self.prompts.token_ids)
        require_finite(samples, "the sampled grid's latents or codes", "the EMA weights may hold NaN or inf")
        return samples

    def _picture(self, samples, captioned: bool) -> torch.Tensor:
        """The samples decoded and tiled (this rank alone)."""
        # Text prompts go under their images (``captioned``); random-token prompts say nothing to read.
        labels = self.prompts.labels if captioned and self.prompts.tag == TAG_TEXT_PROMPTS else None
        images = self.sampler.images(samples)
        # Written as pixels, NaN would be black and inf white: a picture that says nothing true.
        require_finite(images, "the sample grid's decoded images", "the latent decoder's weights may hold NaN or inf")
        return tile_images(images, captions=labels)
