"""The training recipe: one typed, validated object read from a YAML file in ``recipes/``.

A ``Recipe`` is a tree of dataclasses. ``load_recipe`` reads the YAML, applies ``key.path=value``
overrides, checks every value against the dataclass type hints and builds the tree; each dataclass
then checks its own invariants in ``__post_init__`` and ``Recipe`` checks the ones that span
sections (heads vs tensor parallelism, layers vs pipeline stages). So a wrong recipe fails when it
is read, before any process group, model or GPU memory exists. Two checks need facts known only at
launch and are methods the trainer calls: ``Recipe.validate_world`` (world size) and
``Recipe.check_init_paths`` (files on disk).

Every error is a ``ConfigError`` whose message starts with the full dotted key, e.g.
``optim.lr: expected a float, got 'abc' (str)``.

Why not pydantic (installed with DeepSpeed): tried with pydantic 2.14 dataclasses. Its lax mode
silently accepts ``steps: true`` as 1 and ``steps: "3"`` as 3, and reports a misspelt key as
"Field required" plus "Unexpected keyword argument" with no suggestion; its strict mode refuses the
nested mappings YAML gives. ``pretrain.typed_yaml`` (about 200 lines) keeps the stricter checks and
the "did you mean" hints that the recipe tests pin.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

from pretrain.model.config import ConfigError, ModelConfig, _require
from pretrain.typed_yaml import apply_override, convert, dump_yaml, parse_yaml, to_plain

TASKS = ("understanding", "generation", "text")  # same order as datacontract.format.Task
# Seeds feed numpy's SeedSequence (no negatives) and torch generators (64 bits, after the trainer
# mixes in steps and ranks); the sampling command lines take the same range for --seed.
SEED_LIMIT = 2**32


# More background readers per rank than any node has cores for (see DataConfig.loader_workers).
MAX_LOADER_WORKERS = 64


def _require_seed(seed: int, key: str) -> None:
    _require(0 <= seed < SEED_LIMIT, key, f"must be between 0 and {SEED_LIMIT - 1}, got {seed}")


def _require_path(path: Optional[str], key: str) -> None:
    # "" is Path("."), the current folder: it exists, so it would pass every check of a path.
    _require(path is None or bool(path.strip()), key, "must be a non-empty path, or null for none")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How one model replica is split (TP x PP) and how a step's batch is cut into micro-batches.

    Batch sizes count packed sequences of ``data.seq_length`` tokens. The data-parallel size is not
    set here: it follows from the world size at launch (``Recipe.validate_world``).
    """

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    zero_stage: int = 1
    micro_batch_size: int = 1
    global_batch_size: int

    def __post_init__(self) -> None:
        for key in ("tensor_parallel", "pipeline_parallel", "micro_batch_size", "global_batch_size"):
            _require(getattr(self, key) >= 1, f"parallel.{key}", "must be at least 1")
        _require(self.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", "must be 0, 1, 2 or 3")
        # DeepSpeed's pipeline engine does not support partitioning gradients (ZeRO-2) or
        # parameters (ZeRO-3): it asserts at initialisation, after the model is already built.
        _require(
            self.zero_stage <= 1 or self.pipeline_parallel == 1,
            "parallel.zero_stage",
            f"ZeRO stage {self.zero_stage} cannot be combined with parallel.pipeline_parallel="
            f"{self.pipeline_parallel} (DeepSpeed forbids it); use zero_stage 1",
        )
        _require(
            self.global_batch_size % self.micro_batch_size == 0,
            "parallel.global_batch_size",
            f"must be a multiple of parallel.micro_batch_size={self.micro_batch_size}",
        )


@dataclass(frozen=True)
class WorldLayout:
    """The process layout derived at launch: ``world = tensor_parallel * pipeline_parallel * data_parallel``.

    Each optimizer step runs ``grad_accum_steps`` micro-steps of ``micro_batch_size`` sequences on
    every data-parallel rank: ``global_batch_size = micro_batch_size * data_parallel * grad_accum_steps``.
    """

    world_size: int
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    micro_batch_size: int
    grad_accum_steps: int


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with a linear warm-up from 0 to ``lr`` over ``warmup_steps``, then ``schedule``, and a
    linear decay to 0 over the last ``decay_steps`` (0: none, Table 1's constant rate to the end).

    ``steps`` counts optimizer steps (not micro-steps) of this training stage.
    """

    lr: float
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int
    schedule: Literal["constant"] = "constant"
    steps: int
    decay_steps: int = 0

    def __post_init__(self) -> None:
        # NaN fails every comparison and Inf passes "> 0": both are checked by name.
        _require(math.isfinite(self.lr) and self.lr > 0, "optim.lr", f"must be a finite number > 0, got {self.lr}")
        _require(all(0 <= b < 1 for b in self.betas), "optim.betas", "both must be in [0, 1)")
        _require(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "optim.weight_decay",
                 f"must be a finite number >= 0, got {self.weight_decay}")
        _require(math.isfinite(self.grad_clip) and self.grad_clip > 0, "optim.grad_clip",
                 f"must be a finite number > 0, got {self.grad_clip}")
        _require(self.steps >= 1, "optim.steps", "must be at least 1")
        _require(
            0 <= self.warmup_steps <= self.steps,
            "optim.warmup_steps",
            f"must be between 0 and optim.steps={self.steps}",
        )
        _require(
            0 <= self.decay_steps <= self.steps - self.warmup_steps,
            "optim.decay_steps",
            f"must be between 0 and optim.steps - optim.warmup_steps = {self.steps - self.warmup_steps}",
        )


@dataclass(frozen=True, kw_only=True)
class RatioPhase:
    """Relative weights of the three tasks, used for steps ``< until_step`` (``None``: to the end).

    The weights are kept as written (e.g. 14:80:6) so a dumped recipe reads like the paper;
    ``fractions`` gives them normalised to sum to 1.
    """

    until_step: Optional[int]
    understanding: float
    generation: float
    text: float

    def fractions(self) -> dict[str, float]:
        """Task name -> fraction of sampled documents, in ``TASKS`` order, summing to 1."""
        total = sum(getattr(self, t) for t in TASKS)
        return {t: getattr(self, t) / total for t in TASKS}


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Packed-sequence data: lengths, image size, where the shards are and the task mixture.

    ``root`` is the output directory of ``python -m data_tools build`` (its manifest lists the
    shards of every task); ``None`` trains on synthetic batches (smoke runs only).
    """

    seq_length: int = 4096
    # Side in pixels of the square images (Sec. 4.1: 384 for understanding and generation alike).
    resolution: int = 384
    root: Optional[str] = None
    # Background processes per rank that read and decode shards (0: in the training process).
    loader_workers: int = 2
    ratio: list[RatioPhase]
    # Fraction of generation prompts dropped for classifier-free guidance (drawn at training time).
    prompt_drop_prob: float = 0.1
    seed: int = 0
    # A checkpoint's data position counts items of the shards it trained on. Resuming on shards rebuilt
    # with other contents since (more data, a new mixture) is refused unless this is true; then each
    # task's stream keeps its count and continues in the new shards' order.
    resume_on_changed_shards: bool = False

    def __post_init__(self) -> None:
        _require(self.seq_length >= 1, "data.seq_length", "must be at least 1")
        _require(self.resolution >= 1, "data.resolution", "must be at least 1")
        _require(0 <= self.prompt_drop_prob < 1, "data.prompt_drop_prob", "must be in [0, 1)")
        _require(len(self.ratio) >= 1, "data.ratio", "needs at least one phase")
        previous = 0
        for i, phase in enumerate(self.ratio):
            key = f"data.ratio[{i}]"
            for task in TASKS:
                weight = getattr(phase, task)
                _require(math.isfinite(weight) and weight >= 0, f"{key}.{task}",
                         f"must be a finite number >= 0, got {weight}")
            # A sum that overflows to inf would make every fraction 0.
            total = sum(getattr(phase, t) for t in TASKS)
            _require(total > 0, key, "weights must not all be 0")
            _require(math.isfinite(total), key, f"weights sum to {total}; write smaller ones (only their ratios count)")
            last = i == len(self.ratio) - 1
            if last:
                # A schedule that ends before training does would leave later steps undefined.
                _require(
                    phase.until_step is None, f"{key}.until_step", "the last phase must have until_step: null"
                )
            else:
                _require(
                    phase.until_step is not None and phase.until_step > previous,
                    f"{key}.until_step",
                    f"must be an int greater than {previous} (only the last phase is null)",
                )
                previous = phase.until_step
        # Each worker is a process per rank holding its own shard readers: a typo such as 200 for 2
        # forks hundreds of processes on every rank of every node before the first step.
        _require(0 <= self.loader_workers <= MAX_LOADER_WORKERS, "data.loader_workers",
                 f"must be between 0 and {MAX_LOADER_WORKERS} (processes per rank; 2-8 keep a GPU fed), "
                 f"got {self.loader_workers}")
        _require_path(self.root, "data.root")
        _require_seed(self.seed, "data.seed")

    def ratio_at(self, step: int) -> dict[str, float]:
        """Normalised task fractions for optimizer step ``step`` (0-based)."""
        for phase in self.ratio:
            if phase.until_step is None or step < phase.until_step:
                return phase.fractions()
        raise AssertionError("unreachable: the last phase has until_step None")


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """Weights of the objectives and how L_AR is averaged.

    JanusFlow: AR (understanding answers, text), rectified flow and REPA (generation). Janus-Pro:
    AR and ``image_weight`` x the cross-entropy of the image codes (its generation loss).

    ``ar_normalisation`` (neither paper states it): ``pooled_tokens`` averages L_AR over every target
    token of the global step, understanding answers and text rows together, so text rows (every
    token a target) outweigh understanding rows (only the answer) by their token counts;
    ``per_document`` averages each document's target tokens, then averages those means over the
    step's documents, so each understanding document counts as much as each text document, whatever
    its length (``pretrain.step.ar_loss_term``).
    """

    ar_weight: float = 1.0
    rf_weight: float = 1.0
    repa_weight: float = 1.0
    image_weight: float = 1.0
    ar_normalisation: Literal["pooled_tokens", "per_document"] = "pooled_tokens"
    # L_RF's time distribution (JanusFlow): logit(t) ~ Normal(rf_time_mean, rf_time_std), the
    # logit-normal of Stable Diffusion 3 that the paper follows; (0, 1) is SD3's default. With t = 0
    # the noise, a negative mean trains more of the times near the noise, where an image's layout
    # is decided (SD3's resolution "shift" s is the same thing: mean = -ln s). The sampler's
    # ``logit_normal`` step schedule takes the same two numbers.
    rf_time_mean: float = 0.0
    rf_time_std: float = 1.0

    def __post_init__(self) -> None:
        for key in ("ar_weight", "rf_weight", "repa_weight", "image_weight"):
            weight = getattr(self, key)
            _require(math.isfinite(weight) and weight >= 0, f"loss.{key}", f"must be a finite number >= 0, got {weight}")
        _require(math.isfinite(self.rf_time_mean), "loss.rf_time_mean", f"must be finite, got {self.rf_time_mean}")
        _require(math.isfinite(self.rf_time_std) and self.rf_time_std > 0, "loss.rf_time_std",
                 f"must be a finite number > 0, got {self.rf_time_std}")


# Prompts of the periodic sample grid (``train.image_prompts``): short, varied subjects so a grid
# shows at a glance whether colour, count and layout follow the text.
DEFAULT_IMAGE_PROMPTS = (
    "a red apple on a wooden table",
    "a small yellow bird on a branch",
    "a lighthouse on a cliff at sunset",
    "two cats sleeping on a blue sofa",
    "a bowl of ramen, top view",
    "a snowy mountain under a clear sky",
    "a green vintage car in a city street",
    "a watercolor painting of a harbour",
)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training stage: what is trained, precision, EMA, checkpointing and logging.

    ``trainable``: ``new_modules`` = aligners, generation encoder/decoder, time embedding and REPA
    projector (stage 1); ``all_but_und_encoder`` = everything except SigLIP (stage 2); ``all``
    (stage 3). Intervals count optimizer steps.
    """

    stage: str
    trainable: Literal["new_modules", "all_but_und_encoder", "all"]
    ema_decay: float = 0.99
    precision: Literal["bf16", "fp32"] = "bf16"
    seed: int = 0
    # Checkpoint of the previous stage whose model weights start this one (a fresh optimizer).
    init_from: Optional[str] = None
    save_interval: int = 1000
    keep_last: int = 3
    log_interval: int = 10
    # A step is skipped when its loss or gradient is not finite; this many in a row aborts the run.
    max_consecutive_skipped_steps: int = 10
    # Fused Triton kernels (fused_kernels/): "auto" = on CUDA tensors, "reference" = PyTorch everywhere,
    # "triton" = always (fails loudly where Triton cannot run).
    kernels: Literal["auto", "triton", "reference"] = "auto"
    output_dir: str
    # A grid of images sampled from the EMA weights for fixed prompts, logged every this many
    # optimizer steps (TensorBoard and output_dir/samples/); 0 = never.
    image_interval: int = 0
    image_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_IMAGE_PROMPTS))
    # Classifier-free guidance weight (1 = the conditional branch alone) and Euler steps of the grid.
    image_cfg_weight: float = 2.0
    image_euler_steps: int = 30
    # Hangs: a collective waits at most this long (every process group), and the step watchdog ends
    # an iteration (step, save, grid) that runs over max(0.8 x this, 10 x the median recent one) with
    # every thread's stack. Long enough for the slowest rank to write its checkpoint files.
    collective_timeout_minutes: int = 10

    def __post_init__(self) -> None:
        _require(bool(self.stage.strip()), "train.stage", "must be a non-empty name")
        # Larger than a week is a typo, and past ~1.4e12 minutes Python's timedelta overflows at launch.
        _require(1 <= self.collective_timeout_minutes <= 7 * 24 * 60, "train.collective_timeout_minutes",
                 "must be from 1 to 10080 (a week)")
        _require_seed(self.seed, "train.seed")
        _require_path(self.init_from, "train.init_from")
        _require(0 <= self.ema_decay < 1, "train.ema_decay", "must be in [0, 1)")
        for key in ("save_interval", "keep_last", "log_interval", "max_consecutive_skipped_steps"):
            _require(getattr(self, key) >= 1, f"train.{key}", "must be at least 1")
        _require(bool(self.output_dir.strip()), "train.output_dir", "must be a non-empty path")
        _require(self.image_interval >= 0, "train.image_interval", "must be 0 (no sample grid) or more")
        _require(len(self.image_prompts) >= 1, "train.image_prompts", "needs at least one prompt")
        for i, prompt in enumerate(self.image_prompts):
            _require(bool(prompt.strip()), f"train.image_prompts[{i}]", "must be a non-empty prompt")
        _require(
            math.isfinite(self.image_cfg_weight) and self.image_cfg_weight >= 0,
            "train.image_cfg_weight",
            "must be a finite number >= 0 (1 = no guidance, the paper samples with 2)",
        )
        _require(self.image_euler_steps >= 1, "train.image_euler_steps", "must be at least 1")


@dataclass(frozen=True, kw_only=True)
class InitConfig:
    """Local paths of pretrained weights. Never hub ids: nothing is downloaded at training time.

    ``llm``, ``siglip``: components that start stage 1; ``janusflow`` / ``januspro``: a released
    checkpoint of that family; ``vae``: JanusFlow's frozen SDXL-VAE, needed in every stage unless
    latents are in the shards; ``vq``: Janus-Pro's VQ-16 tokenizer (the shards hold the codes, so
    training never needs it; the sample grid decodes with it).
    """

    llm: Optional[str] = None
    siglip: Optional[str] = None
    vae: Optional[str] = None
    janusflow: Optional[str] = None
    januspro: Optional[str] = None
    vq: Optional[str] = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _require_path(getattr(self, f.name), f"init.{f.name}")


# An "org/name" string with no leading "/" or "." is what a hub id looks like.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """Everything one training stage needs. Build with ``load_recipe``; see the module docstring."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig
    optim: OptimConfig
    data: DataConfig
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig
    init: InitConfig = field(default_factory=InitConfig)

    def __post_init__(self) -> None:
        llm, tp, pp = self.model.llm, self.parallel.tensor_parallel, self.parallel.pipeline_parallel
        # Megatron splits attention heads, key/value groups and FFN columns evenly across TP ranks.
        for key, value in (
            ("num_attention_heads", llm.num_attention_heads),
            ("num_query_groups", llm.query_groups),
            ("ffn_hidden_size", llm.ffn_hidden_size),
        ):
            _require(
                value % tp == 0,
                "parallel.tensor_parallel",
                f"{tp} must divide model.llm.{key}={value}; choose a divisor of {value}",
            )
        _require(
            llm.num_layers % pp == 0,
            "parallel.pipeline_parallel",
            f"{pp} must divide model.llm.num_layers={llm.num_layers} (equal blocks per stage)",
        )
        # SigLIP's position embeddings fix its input size; images are resized to data.resolution.
        _require(
            self.data.resolution == self.model.und_encoder.image_size,
            "data.resolution",
            f"must equal model.und_encoder.image_size={self.model.und_encoder.image_size}",
        )
        if self.model.family == "januspro":
            generated = self.model.image_tokens.num_codes(self.data.resolution) + 2  # begin/end of image
            for key in ("janusflow", "vae"):
                _require(getattr(self.init, key) is None, f"init.{key}", "is JanusFlow's; a Janus-Pro recipe does not use it")
        else:
            generated = self.model.gen_vision.num_latent_tokens + 1  # the time token
            for key in ("januspro", "vq"):
                _require(getattr(self.init, key) is None, f"init.{key}", "is Janus-Pro's; a JanusFlow recipe does not use it")
        longest_image = max(self.model.und_encoder.num_image_tokens, generated)
        _require(
            self.data.seq_length > longest_image,
            "data.seq_length",
            f"must exceed the {longest_image} positions of one image so a document fits",
        )
        # Two sources for the same weights would make the start of the stage ambiguous.
        sources = [
            name
            for name, is_set in (
                ("train.init_from", self.train.init_from is not None),
                ("init.janusflow", self.init.janusflow is not None),
                ("init.januspro", self.init.januspro is not None),
                ("init.llm/init.siglip", self.init.llm is not None or self.init.siglip is not None),
            )
            if is_set
        ]
        if len(sources) > 1:
            raise ConfigError(f"{sources[0]}: set only one of {', '.join(sources)} as the starting weights")

    def validate_world(self, world_size: int) -> WorldLayout:
        """Check the recipe against ``world_size`` processes; return the derived layout."""
        p = self.parallel
        replica = p.tensor_parallel * p.pipeline_parallel
        _require(
            world_size >= 1 and world_size % replica == 0,
            "parallel.tensor_parallel",
            f"tensor_parallel x pipeline_parallel = {replica} must divide the world size {world_size}",
        )
        dp = world_size // replica
        per_micro_step = p.micro_batch_size * dp
        _require(
            p.global_batch_size % per_micro_step == 0,
            "parallel.global_batch_size",
            f"{p.global_batch_size} must be a multiple of micro_batch_size x data_parallel = "
            f"{p.micro_batch_size} x {dp} = {per_micro_step}; change it or the world size",
        )
        return WorldLayout(
            world_size=world_size,
            tensor_parallel=p.tensor_parallel,
            pipeline_parallel=p.pipeline_parallel,
            data_parallel=dp,
            micro_batch_size=p.micro_batch_size,
            grad_accum_steps=p.global_batch_size // per_micro_step,
        )

    def check_init_paths(self) -> None:
        """Raise ``ConfigError`` for a set ``init.*`` or ``train.init_from`` path that does not exist."""
        paths = {f"init.{f.name}": getattr(self.init, f.name) for f in dataclasses.fields(self.init)}
        paths["train.init_from"] = self.train.init_from
        for key, path in paths.items():
            if path is None or Path(path).exists():
                continue
            hint = ""
            if _HUB_ID.match(path):
                hint = " (it looks like a hub id: download the weights and give their local directory)"
            raise ConfigError(f"{key}: {path!r} does not exist; weights load from local paths only{hint}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists and scalars; ``build_recipe(r.to_dict()) == r``."""
        return to_plain(self)

    def to_yaml(self) -> str:
        """The whole recipe, defaults included, as YAML that ``load_recipe`` reads back equal."""
        return dump_yaml(self.to_dict())


# Shipped recipes are a few KiB; a bigger file is not a recipe (``/dev/zero`` would fill the memory).
MAX_RECIPE_BYTES = 1 << 20


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe YAML, apply ``key.path=value`` overrides in order, and build the ``Recipe``."""
    if not str(path).strip():  # Path("") is the current folder
        raise ConfigError("recipe: the path is empty; give a recipe file, e.g. recipes/tiny_cpu.yaml")
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_RECIPE_BYTES + 1)
    except IsADirectoryError:
        raise ConfigError(f"{path}: a folder, not a recipe file") from None
    # Other OSErrors (missing, no permission) stay OSErrors: callers report them with their own option.
    if len(raw) > MAX_RECIPE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_RECIPE_BYTES >> 20} MiB; a recipe is a short YAML text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); a recipe is a YAML text file") from None
    data = parse_yaml(text, f"{path}: not valid YAML")
    if data is None:
        raise ConfigError(f"{path}: empty; a recipe sets at least parallel, optim, data and train")
    return build_recipe(data, overrides)


def build_recipe(data: Mapping[str, Any], overrides: Sequence[str] = ()) -> Recipe:
    """Build a ``Recipe`` from plain data (as ``Recipe.to_dict`` gives) plus overrides.

    An override is ``a.b.c=value``; list items are addressed as ``data.ratio[1].text`` (or
    ``data.ratio.1.text``); the value is parsed as YAML (``2e-5``, ``[0.9, 0.99]``, ``null``).
    Missing sections are created, so an unknown key in an override fails like one in the file.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"recipe: expected a mapping of sections, got {type(data).__name__}")
    data = copy.deepcopy(dict(data))
    for override in overrides:
        apply_override(data, override)
    return convert(data, Recipe, "")


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write ``recipe`` as YAML (e.g. next to a checkpoint, so a run records what it trained with)."""
    Path(path).write_text(recipe.to_yaml())
