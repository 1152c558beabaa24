"""Checkpoints: DeepSpeed's engine state plus ours (EMA, data position, RNG, step), saved atomically.

Layout of ``output_dir/checkpoints``:
  step_00000100/            one complete checkpoint (DeepSpeed's files + ours)
    COMPLETE                written last: a directory without it is an interrupted save, ignored
    ema_mp{tp}_{pp}.safetensors   EMA weights of each model-parallel rank (identical across DP)
    ema_full.safetensors    the EMA under full-state names (universal checkpoints only: any layout
                            takes its slices from it)
    mp_rank_{tp}_model_states.pt  DeepSpeed's model states (pipeline_parallel = 1), or
    layer_{pp}-model_{tp}-model_states.pt  those of each pipeline stage (pipeline engine)
    trainer_rank{R}.json    per-rank step, data-loader position and RNG state
  latest                    name of the newest complete checkpoint, replaced atomically

A kill during a save leaves ``latest`` pointing at the previous complete checkpoint. Only the
``keep_last`` newest complete checkpoints are kept.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from ..runtime.distributed import Runtime

_TAG = re.compile(r"^step_(\d{8})$")
EMA_FULL_FILE = "ema_full.safetensors"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def complete_tags(ckpt_dir: Path) -> list[str]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(d.name for d in ckpt_dir.iterdir() if _TAG.match(d.name) and (d / "COMPLETE").exists())


def latest_tag(ckpt_dir: Path) -> Optional[str]:
    """The tag ``latest`` names if it is complete, else the newest complete one, else None."""
    pointer = ckpt_dir / "latest"
    if pointer.exists():
        tag = pointer.read_text().strip()
        if (ckpt_dir / tag / "COMPLETE").exists():
            return tag
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """(checkpoints folder, tag) for a run folder, its ``checkpoints`` folder, a ``latest`` file or
    one checkpoint folder (what ``train.init_from`` may name)."""
    path = Path(path)
    if path.name == "latest" and path.is_file():
        path = path.parent
    if (path / "COMPLETE").exists() and _TAG.match(path.name.removesuffix("_universal")):
        return path.parent, path.name
    for folder in (path, path / "checkpoints"):
        tag = latest_tag(folder)
        if tag is not None:
            return folder, tag
    raise FileNotFoundError(f"{path}: no complete checkpoint (expected a run folder, its checkpoints folder, "
                            "a 'latest' file or a step_XXXXXXXX folder)")


def _rng_state() -> dict:
    return {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}


def _set_rng_state(state: dict) -> None:
    raw = base64.b64decode(state["torch"])
    torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


def save_checkpoint(engine, ckpt_dir: Path, step: int, runtime: Runtime, ema, loader_state: dict,
                    trainer_state: dict, keep_last: int, vocab_size: int) -> str:
    """Collective: every rank calls it. Returns the tag written."""
    tag = tag_for(step)
    target = ckpt_dir / tag
    if runtime.rank == 0 and target.exists():  # a leftover of an interrupted save of this step
        shutil.rmtree(target)
    torch.distributed.barrier()
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    from .universal import sharding_patterns

    # The sharding patterns let ds_to_universal merge tensor-parallel slices (layout changes).
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False,
                           client_state={UNIVERSAL_CHECKPOINT_INFO: sharding_patterns(vocab_size)})
    if runtime.dp_rank == 0 and ema is not None:
        save_file({k: v.contiguous() for k, v in ema.shadow.items()}, target / f"ema_mp{runtime.tp_rank}_{runtime.pp_rank}.safetensors")
    state = {"step": step, "loader": loader_state, "rng": _rng_state(), "dp_size": runtime.dp_size,
             "tp_size": runtime.tp_size, "pp_size": runtime.pp_size, **trainer_state}
    (target / f"trainer_rank{runtime.rank}.json").write_text(json.dumps(state))
    torch.distributed.barrier()
    if runtime.rank == 0:
        (target / "COMPLETE").write_text("ok\n")
        _atomic_write(ckpt_dir / "latest", tag)
        for old in complete_tags(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    torch.distributed.barrier()
    return tag


def load_checkpoint(engine, ckpt_dir: Path, tag: str, runtime: Runtime, ema, load_optimizer: bool = True) -> dict:
    """Restore engine (model, optimizer, LR schedule), EMA and RNG; returns this rank's trainer state."""
    engine.load_checkpoint(
        str(ckpt_dir), tag=tag, load_optimizer_states=load_optimizer, load_lr_scheduler_states=load_optimizer
    )
    target = ckpt_dir / tag
    universal = tag.endswith("_universal")
    state_path = target / f"trainer_rank{runtime.rank}.json"
    if not state_path.exists() and not universal:
        raise FileNotFoundError(
            f"{state_path}: this checkpoint was saved by a different world size; convert it with "
            "`python -m pretrain.train.universal --run RUN` to change the layout"
        )
    # After a layout change (universal checkpoint) a rank may have no state of its own, or the file of
    # its rank number belongs to another place in the old layout (another data-parallel rank): the
    # step and counters are the same on every rank, and the data position is replayed by the trainer.
    state = json.loads((state_path if state_path.exists() else target / "trainer_rank0.json").read_text())
    current = {"dp_size": runtime.dp_size, "tp_size": runtime.tp_size, "pp_size": runtime.pp_size}
    state["layout_changed"] = not state_path.exists() or any(
        key in state and state[key] != value for key, value in current.items())
    if not state["layout_changed"]:
        _set_rng_state(state["rng"])
    if ema is not None and not _restore_ema(ema, target, runtime):
        state["ema_restarted"] = True  # the averages restart from the current weights
    return state


def _restore_ema(ema, folder: Path, runtime: Runtime) -> bool:
    """This rank's EMA from a checkpoint: its slices of the full-state EMA of a universal checkpoint
    (any layout), else the file of its own model-parallel rank; False when neither fits it."""
    from safetensors import safe_open

    from ..convert.state import full_tensor_names, local_slices

    expected = {k: tuple(v.shape) for k, v in ema.shadow.items()}
    if (folder / EMA_FULL_FILE).exists():
        names = full_tensor_names(ema.model)
        wanted = {names[k] for k in ema.shadow}
        with safe_open(str(folder / EMA_FULL_FILE), framework="pt") as f:
            if not wanted <= set(f.keys()):  # e.g. train.trainable changed: nothing to average from
                return False
            full = {name: f.get_tensor(name) for name in wanted}
        saved = local_slices(ema.model, full, ema.shadow)
    else:
        own = folder / f"ema_mp{runtime.tp_rank}_{runtime.pp_rank}.safetensors"
        saved = load_file(own) if own.exists() else {}
    if {k: tuple(v.shape) for k, v in saved.items()} != expected:  # another layout's stage-local names
        return False
    ema.load_state_dict({"decay": ema.decay, "shadow": saved})
    return True


# ---------------------------------------------------------------------------------------------
# reading the weights back, whatever the layout they were trained in
_PIPELINE_FILE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
_MODEL_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")


def _stage_files(folder: Path) -> dict[int, list[Path]]:
    """{pipeline stage: model-state files of its tensor-parallel ranks, in rank order}."""
    stages: dict[int, dict[int, Path]] = {}
    for file in folder.iterdir():
        if match := _PIPELINE_FILE.match(file.name):
            stages.setdefault(int(match[1]), {})[int(match[2])] = file
    if not stages:  # trained without pipeline parallelism
        ranks = {int(m[1]): f for f in folder.iterdir() if (m := _MODEL_FILE.match(f.name))}
        stages = {0: ranks} if ranks else {}
    return {stage: [ranks[r] for r in sorted(ranks)] for stage, ranks in sorted(stages.items())}


def stage_layer_numbers(num_layers: int, pipeline_parallel: int, stage: int) -> list[int]:
    """Global 1-based transformer blocks of a pipeline stage (megatron-core's even split)."""
    per_stage = num_layers // pipeline_parallel
    return list(range(stage * per_stage + 1, (stage + 1) * per_stage + 1))


def checkpoint_weights(ckpt_dir: Path, tag: str, cfg, weights: str = "raw") -> dict[str, torch.Tensor]:
    """Our full model state (``pretrain.convert.state`` names) from a checkpoint of any layout.

    ``weights``: ``raw`` (the trained weights) or ``ema`` (the averages of the trained tensors over
    the raw frozen ones). Tensor-parallel shards are gathered per pipeline stage with the converter
    that shards them, and the stages are put together.
    """
    if weights not in ("raw", "ema"):
        raise ValueError(f"weights={weights!r}: expected 'raw' or 'ema'")
    folder = ckpt_dir / tag
    stages = _stage_files(folder)
    if not stages:
        raise FileNotFoundError(f"{folder}: no DeepSpeed model states (mp_rank_*_model_states.pt or "
                                "layer_*-model_*-model_states.pt)")
    pipelined = _PIPELINE_FILE.match(stages[0][0].name) is not None
    full: dict[str, torch.Tensor] = {}
    for stage, files in stages.items():
        shards = []
        for tp_rank, file in enumerate(files):
            state = torch.load(file, map_location="cpu", weights_only=True)
            # The pipeline engine saves our PipelineStage, whose parameters are ``model.*``.
            state = {k.removeprefix("model."): v for k, v in state.items()} if pipelined else state["module"]
            state = {k: v for k, v in state.items() if not k.endswith("._extra_state")}  # megatron's, empty
            if weights == "ema":
                state.update(_ema_shard(folder, tp_rank, stage))
            shards.append(state)
        full.update(_gather_stage(shards, cfg, len(stages), stage))
    return full


def checkpoint_ema(ckpt_dir: Path, tag: str, cfg) -> dict[str, torch.Tensor]:
    """The EMA of a checkpoint of any layout under full-state names: the averages of the trained
    tensors only (what ``ema_full.safetensors`` of a universal checkpoint holds)."""
    folder = ckpt_dir / tag
    stages = _stage_files(folder)
    full: dict[str, torch.Tensor] = {}
    for stage, files in stages.items():
        shards = [_ema_shard(folder, tp_rank, stage) for tp_rank in range(len(files))]
        full.update(_gather_stage(shards, cfg, len(stages), stage, subset=True))
    return full


def _ema_shard(folder: Path, tp_rank: int, stage: int) -> dict[str, torch.Tensor]:
    ema_file = folder / f"ema_mp{tp_rank}_{stage}.safetensors"
    if not ema_file.exists():
        raise FileNotFoundError(f"{ema_file}: no EMA weights in this checkpoint; export --weights raw")
    return load_file(str(ema_file))


def _gather_stage(shards: list[dict], cfg, num_stages: int, stage: int, subset: bool = False) -> dict:
    """Full-state tensors of one pipeline stage from the local states of its tensor-parallel ranks
    (``subset``: the tensors the shards hold, else every tensor of the stage)."""
    from ..convert.llama import gather_llm_shards
    from ..convert.state import LLM_PREFIX

    llm_shards = [{k[len(LLM_PREFIX):]: v for k, v in s.items() if k.startswith(LLM_PREFIX)} for s in shards]
    layers = stage_layer_numbers(cfg.llm.num_layers, num_stages, stage)
    llm = gather_llm_shards(llm_shards, cfg.llm, layers, stage == 0, stage == num_stages - 1,
                            keys=list(llm_shards[0]) if subset else None)
    full = {LLM_PREFIX + k: v for k, v in llm.items()}
    # Modules outside the LLM are replicated over tensor-parallel ranks: take rank 0's.
    full.update({k: v for k, v in shards[0].items() if not k.startswith(LLM_PREFIX)})
    return full
