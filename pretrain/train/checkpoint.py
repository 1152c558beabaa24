"""Checkpoints: DeepSpeed's engine state plus ours (EMA, data position, RNG, step), saved atomically.

Layout of ``output_dir/checkpoints``:
  step_00000100/            one complete checkpoint (DeepSpeed's files + ours)
    COMPLETE                written last: a directory without it is an interrupted save, ignored
    ema_mp{tp}_{pp}.safetensors   EMA weights of each model-parallel rank (identical across DP)
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
                    trainer_state: dict, keep_last: int) -> str:
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
                           client_state={UNIVERSAL_CHECKPOINT_INFO: sharding_patterns(engine.module.cfg.llm.vocab_size)})
    if runtime.dp_rank == 0 and ema is not None:
        save_file({k: v.contiguous() for k, v in ema.shadow.items()}, target / f"ema_mp{runtime.tp_rank}_{runtime.pp_rank}.safetensors")
    state = {"step": step, "loader": loader_state, "rng": _rng_state(), "dp_size": runtime.dp_size,
             "tp_size": runtime.tp_size, **trainer_state}
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
    # After a layout change (universal checkpoint) a rank may have no state of its own: the step and
    # counters are the same on every rank, and the data position is replayed by the trainer.
    state = json.loads((state_path if state_path.exists() else target / "trainer_rank0.json").read_text())
    state["layout_changed"] = not state_path.exists() or state["dp_size"] != runtime.dp_size
    if not state["layout_changed"]:
        _set_rng_state(state["rng"])
    ema_path = target / f"ema_mp{runtime.tp_rank}_{runtime.pp_rank}.safetensors"
    if ema is not None:
        saved = load_file(ema_path) if ema_path.exists() else {}
        if {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in ema.shadow.items()}:
            ema.load_state_dict({"decay": ema.decay, "shadow": saved})
        else:  # the tensor-parallel layout changed: the averages restart from the current weights
            state["ema_restarted"] = True
    return state
