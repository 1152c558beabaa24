"""Checks before anything is built: what can be known from the recipe, the launch and the disk.

``preflight`` runs in ``pretrain.main`` before any process group, model or GPU memory exists, on
every rank (they all reach the same verdict; rank 0 prints it). Each failure is one line that starts
with the recipe key (or command-line flag) to fix:

* ``--steps``: at least 1 (0 used to train the whole run);
* the world size against the parallel layout (``Recipe.validate_world``) and ``parallel.zero_stage``
  (the trainer needs 1 or 2: stage 0 has no overflow check to skip bad steps, ZeRO-3 partitions the
  parameters the trainer reads whole);
* ``init.*`` / ``train.init_from`` paths exist (``Recipe.check_init_paths``);
* ``data.root``: a finished build whose shards fit the recipe (``check_layout``: model family,
  resolution, tokens per image, sequence length, latent shape; for image codes the codec's kind,
  codebook and grid against ``model.image_tokens``) and hold every task the mix gives weight to;
* ``train.output_dir``: its checkpoints folder can be written (found at the first save otherwise),
  and its path holds no [ * ? (DeepSpeed globs it when it loads: such a run could never resume);
* a run to resume: its newest usable checkpoint was saved in this parallel layout (else convert it
  with ``pretrain.train.universal``) and with the same model as this recipe.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Optional

from ..model.config import ConfigError
from ..recipe import TASKS, Recipe, WorldLayout, load_recipe
from .monitor import METRICS_FILE, TENSORBOARD_DIR

RUN_RECIPE_FILE = "recipe.yaml"


def check_steps(max_steps: Optional[int], recipe: Recipe) -> None:
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"--steps: must be at least 1, got {max_steps}; omit it to train optim.steps="
                          f"{recipe.optim.steps}")
    if max_steps is not None and max_steps > recipe.optim.steps:
        # The stage's schedule (and its planned end) is optim.steps: stopping later is not a stop.
        raise ConfigError(f"--steps: {max_steps} is past optim.steps={recipe.optim.steps}, where this stage ends; "
                          f"to train longer raise it (--set optim.steps={max_steps})")


def check_zero_stage(recipe: Recipe) -> None:
    stage = recipe.parallel.zero_stage
    if stage == 0:
        raise ConfigError("parallel.zero_stage: 0 has no overflow check, so the trainer could not skip a step with "
                          "a NaN/Inf gradient; use 1 or 2")
    if stage == 3:
        raise ConfigError("parallel.zero_stage: 3 partitions the parameters, which the trainer's EMA, sample grid "
                          "and backward read whole (it fails at the first backward); use 1 or 2")


def check_data(recipe: Recipe) -> None:
    """``data.root``: a finished ``data_tools build`` whose shards fit the recipe."""
    root = recipe.data.root
    if root is None:
        return
    if not Path(root).is_dir():
        raise ConfigError(f"data.root: {root!r} is not a folder; give the output root of `python -m data_tools build` "
                          "(or null for synthetic batches)")
    from datacontract.format import Task
    from datacontract.shards import ShardError, ShardLayout, TASK_DIRS, check_manifest, read_manifest, shard_paths

    try:
        manifest = read_manifest(root)
        check_manifest(root, manifest)  # the entries shard_paths reads, each refusal a line naming it
        layout = ShardLayout.from_json(manifest["layout"])
    except (FileNotFoundError, ShardError) as err:
        raise ConfigError(f"data.root: {err}") from None
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"data.root: {root}/manifest.json is damaged ({type(err).__name__}: {err}); rebuild the "
                          "shards") from None
    try:
        check_layout(layout, recipe)
    except ValueError as err:
        raise ConfigError(str(err).replace(f"data.root={root}", f"data.root: {root}", 1)) from None
    weighted = {t for phase in recipe.data.ratio for t in TASKS if getattr(phase, t) > 0}
    for task in Task:
        name = TASKS[int(task)]
        if name in weighted and not sum(rows for _, rows in shard_paths(root, manifest, task)):
            raise ConfigError(f"data.root: {root} has no {TASK_DIRS[task]} sequences, but data.ratio gives "
                              f"{name} weight; build them or set its weight to 0")


def layout_mismatches(layout, recipe: Recipe) -> list[str]:
    """How the shards' ``ShardLayout`` differs from what the recipe's model reads, one entry per
    difference, each starting with the recipe key to fix (empty: they fit)."""
    cfg = recipe.model
    shard_family = getattr(layout, "family", "janusflow")
    if shard_family != cfg.family:
        return [f"model.family: shards were built for {shard_family}, the recipe trains {cfg.family} (rebuild "
                f"with data_tools build --family {cfg.family})"]
    res = recipe.data.resolution
    wrong = []
    if layout.resolution != res:
        wrong.append(f"data.resolution: shards {layout.resolution}, recipe {res}")
    if layout.und_tokens_per_image != cfg.und_encoder.num_image_tokens:
        wrong.append(f"model.und_encoder: shards have {layout.und_tokens_per_image} tokens per understanding image, "
                     f"recipe {cfg.und_encoder.num_image_tokens}")
    if layout.seq_length > recipe.data.seq_length:
        wrong.append(f"data.seq_length: shards {layout.seq_length} > recipe data.seq_length {recipe.data.seq_length}")
    if cfg.family == "januspro":
        it, codec = cfg.image_tokens, layout.image_codec or {}
        if codec.get("kind") != it.codec:
            wrong.append(f"model.image_tokens.codec: shards {codec.get('kind')!r}, recipe {it.codec!r}")
        if codec.get("codebook_size") != it.codebook_size:
            wrong.append(f"model.image_tokens.codebook_size: shards {codec.get('codebook_size')}, recipe "
                         f"{it.codebook_size}")
        grid = it.grid_side(res)
        if codec.get("downsample") != it.downsample or layout.gen_tokens_per_image != grid * grid:
            wrong.append(f"model.image_tokens.downsample: shards {codec.get('downsample')} "
                         f"({layout.gen_tokens_per_image} codes per image), recipe {it.downsample} "
                         f"({grid}x{grid} at {res} px)")
        return wrong
    gv = cfg.gen_vision
    if layout.gen_tokens_per_image != gv.num_latent_tokens:
        wrong.append(f"model.gen_vision: shards have {layout.gen_tokens_per_image} tokens per generation image, "
                     f"recipe {gv.num_latent_tokens}")
    if layout.latent_shape and tuple(layout.latent_shape) != (gv.latent_channels, gv.latent_size, gv.latent_size):
        wrong.append(f"model.gen_vision latent shape: shards {tuple(layout.latent_shape)}, recipe "
                     f"{(gv.latent_channels, gv.latent_size, gv.latent_size)}")
    return wrong


def check_layout(layout, recipe: Recipe) -> None:
    """Fail before training when the shards were built for another model or sequence length (one
    line, naming the recipe keys; ``ValueError``)."""
    wrong = layout_mismatches(layout, recipe)
    if wrong:
        raise ValueError(f"data.root={recipe.data.root}: shards do not fit the recipe ({'; '.join(wrong)}); "
                         "rebuild them with matching data_tools options or fix the recipe")


def check_output_dir(recipe: Recipe, rank: int) -> Path:
    """The checkpoints folder exists and takes a file, and DeepSpeed can find its files again; returns it."""
    ckpt = Path(recipe.train.output_dir) / "checkpoints"
    if glob.has_magic(str(ckpt)):
        # DeepSpeed finds a checkpoint's model files with a glob of the folder's path: with [ * ? in
        # it a run saves but can never resume (it finds no files, or another folder's).
        raise ConfigError(f"train.output_dir: {recipe.train.output_dir} holds one of the characters [ * ?, which "
                          "DeepSpeed's checkpoint loading reads as a pattern, so the run could never resume; "
                          "choose a folder without them")
    probe = ckpt / f".write_probe_rank{rank}"
    try:
        ckpt.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"train.output_dir: cannot write checkpoints to {ckpt} ({err.strerror or err}); choose a "
                          "writable folder") from None
    # Here on every rank, not when rank 0 opens them: a rank that stopped alone would leave the others
    # waiting in their first collective until the timeout.
    for name, kind, is_kind in ((METRICS_FILE, "a file", os.path.isfile), (TENSORBOARD_DIR, "a folder", os.path.isdir)):
        path = Path(recipe.train.output_dir) / name
        if os.path.lexists(path) and not is_kind(path):
            raise ConfigError(f"train.output_dir: {path} is there but not {kind}, which the run writes its logs to; "
                              "move it away, or choose another folder")
    return ckpt


def _differences(recorded: dict, wanted: dict, prefix: str) -> list[str]:
    out = []
    for key in sorted(set(recorded) | set(wanted)):
        a, b = recorded.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}.{key}")
        elif a != b:
            out.append(f"{prefix}.{key}: checkpoint {a!r}, recipe {b!r}")
    return out


def check_resume(recipe: Recipe, world: WorldLayout, ckpt: Path) -> Optional[str]:
    """The checkpoint a launch would resume from (None: a new run) fits this launch's layout and model."""
    from .checkpoint import latest_tag, layout_change_error

    tag = latest_tag(ckpt)  # CheckpointError when checkpoints exist but none is usable
    if tag is None:
        return None
    current = {"dp_size": world.data_parallel, "tp_size": world.tensor_parallel, "pp_size": world.pipeline_parallel}
    message = layout_change_error(ckpt / tag, current)
    if message:
        raise ConfigError(f"parallel: {message}")
    recorded_path = ckpt.parent / RUN_RECIPE_FILE
    try:
        recorded = load_recipe(recorded_path)
    except (ConfigError, OSError):
        return tag  # no usable record of the run: DeepSpeed's own shape checks remain
    sections = [("model", recorded.to_dict()["model"], recipe.to_dict()["model"])]
    if not tag.endswith("_universal"):  # the optimizer's parameter groups follow what is trained
        sections.append(("train", {"trainable": recorded.train.trainable}, {"trainable": recipe.train.trainable}))
    wrong = [line for name, a, b in sections for line in _differences(a, b, name)]
    if wrong:
        raise ConfigError(f"{wrong[0].split(':')[0]}: this recipe does not match the run it would resume "
                          f"({ckpt / tag}; {'; '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}); resume with "
                          f"{recorded_path}, or start a new stage in another train.output_dir with "
                          f"train.init_from={ckpt.parent}")
    return tag


def preflight(recipe: Recipe, max_steps: Optional[int], world_size: int, rank: int = 0) -> WorldLayout:
    """Every check above, cheapest first; raises ``ConfigError`` (or ``CheckpointError`` for a run
    whose checkpoints are all unusable). Returns the derived world layout."""
    check_steps(max_steps, recipe)
    world = recipe.validate_world(world_size)
    check_zero_stage(recipe)
    recipe.check_init_paths()
    check_data(recipe)
    ckpt = check_output_dir(recipe, rank)
    check_resume(recipe, world, ckpt)
    return world


def record_run_recipe(recipe: Recipe, output_dir: Path, rank: int) -> None:
    """Write ``output_dir/recipe.yaml`` (rank 0) once the run has started or resumed successfully,
    so a failed resume never replaces the recipe export and ``train.init_from`` read."""
    if rank == 0:
        from ..recipe import dump_recipe

        output_dir.mkdir(parents=True, exist_ok=True)
        tmp = output_dir / (RUN_RECIPE_FILE + ".tmp")
        dump_recipe(recipe, tmp)
        os.replace(tmp, output_dir / RUN_RECIPE_FILE)
