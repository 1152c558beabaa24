"""Checkpoints: DeepSpeed's engine state plus ours (EMA, data position, RNG, step), saved atomically,
verified before they are used, and loaded without running code.

Layout of ``output_dir/checkpoints``:
  step_00000100/            one complete checkpoint (DeepSpeed's files + ours)
    COMPLETE                written last: a directory without it is an interrupted save, ignored
    MANIFEST.json           size and SHA-256 of every other file, the layout; written just before COMPLETE
    ema_mp{tp}_{pp}_dp{dp}.safetensors  each rank's fragments of the EMA of the fp32 masters (sharded
                            like ZeRO's optimizer state; their places in the metadata, ``ema_layout``)
    ema_full.safetensors    the EMA under full-state names (universal checkpoints only: any layout
                            takes its slices from it)
    mp_rank_{tp}_model_states.pt  DeepSpeed's model states (pipeline_parallel = 1), or
    layer_{pp}-model_{tp}-model_states.pt  those of each pipeline stage (pipeline engine)
    trainer_rank{R}.json    per-rank step, data-loader position and RNG state
  latest                    name of the newest complete checkpoint, replaced atomically

A kill during a save leaves ``latest`` pointing at the previous complete checkpoint. A checkpoint
whose weights, optimizer state or EMA hold a NaN/Inf is never written (``save_checkpoint`` raises),
nor is one whose files could not all be written (a full disk): ``latest`` keeps naming the previous
one. Only the ``keep_last`` newest complete checkpoints are kept, and never the newest healthy one
(complete, with a manifest whose files are all there at their saved sizes) is deleted.

At load every rank re-hashes a share of the files (``MANIFEST.json``) before DeepSpeed opens any,
and a damaged or incomplete checkpoint is skipped for the previous good one with a line naming
the bad file. DeepSpeed's files are unpickled weights-only (``safe_load``). Every error is a
``CheckpointError`` naming the checkpoint, the file and what to do.

Collectives go through ``_barrier`` and ``_all_gather_object`` only.
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

from .safe_load import (
    CheckpointError, hash_problems, hash_share, listed_files, read_manifest, stat_problems,
    weights_only_loading, write_manifest,
)

_TAG = re.compile(r"^step_(\d{8})$")
_ANY_TAG = re.compile(r"^step_\d{8}(_universal)?$")
EMA_FULL_FILE = "ema_full.safetensors"
UNIVERSAL_HINT = "python -m pretrain.train.universal --run RUN"

# Reading a checkpoint's weights back outside training (export, universal, the next stage's start)
# is pretrain.train.offline_weights.
__all__ = ["CheckpointError", "latest_tag", "load_checkpoint", "resolve_checkpoint", "save_checkpoint"]


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _say(message: str) -> None:
    """One line on rank 0 (every rank reaches the same verdicts; one of them speaks)."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"[checkpoint] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# the only collectives of this module (the runtime's communication module may take them over)
def _barrier(runtime) -> None:
    runtime.comm.barrier()


def _all_gather_object(runtime, obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (a small picklable object)."""
    if runtime.world_size == 1:
        return [obj]
    return runtime.comm.all_gather_object(obj)


# ---------------------------------------------------------------------------------------------
# which checkpoint
def complete_tags(ckpt_dir: Path) -> list[str]:
    """Complete checkpoints saved by training (not universal conversions), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(d.name for d in ckpt_dir.iterdir() if _TAG.match(d.name) and (d / "COMPLETE").exists())


def _read_pointer(ckpt_dir: Path) -> Optional[str]:
    """The tag ``latest`` names, or None when it is absent or not a checkpoint name (damaged)."""
    pointer = ckpt_dir / "latest"
    if not pointer.exists():
        return None
    raw = pointer.read_bytes()
    try:
        tag = raw.decode().strip()
    except UnicodeDecodeError:
        tag = ""
    if not _ANY_TAG.match(tag):
        _say(f"{pointer} is damaged (it holds {raw[:32]!r}, not a checkpoint name); "
             "using the newest complete checkpoint instead")
        return None
    return tag


def _candidates(ckpt_dir: Path) -> list[str]:
    """Complete checkpoints to resume from, best first: the one ``latest`` names, then newest first."""
    if not ckpt_dir.is_dir():
        return []
    complete = sorted((d.name for d in ckpt_dir.iterdir() if _ANY_TAG.match(d.name) and (d / "COMPLETE").exists()),
                      reverse=True)
    pointed = _read_pointer(ckpt_dir)
    first = [pointed] if pointed in complete else []
    return first + [t for t in complete if t != pointed]


def quick_problems(folder: Path, weights_only: bool = False) -> list[str]:
    """What a stat of the files finds wrong with a complete checkpoint (no file is read in full):
    files of the manifest missing or resized; without a manifest (saved before manifests existed),
    the per-rank trainer files of the saved world (unless only the weights will be read)."""
    manifest = read_manifest(folder)
    if manifest is not None:
        if weights_only:  # optimizer and trainer files are not read: their loss must not hide the weights
            return stat_problems(folder, manifest, [n for n in manifest["files"] if _is_weights_file(n)])
        return stat_problems(folder, manifest)
    if weights_only:
        return []
    state = read_trainer_state(folder / "trainer_rank0.json")
    world = state.get("dp_size", 1) * state.get("tp_size", 1) * state.get("pp_size", 1)
    return [f"{folder / f'trainer_rank{r}.json'}: missing" for r in range(world)
            if not (folder / f"trainer_rank{r}.json").exists()]


def _is_weights_file(name: str) -> bool:
    """Model states (DeepSpeed's, of any layout) and our EMA shards: what export and init_from read."""
    return name.endswith("model_states.pt") or name.startswith("ema_")


def _describe(problems: list[str]) -> str:
    return problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")


def latest_tag(ckpt_dir: Path, weights_only: bool = False) -> Optional[str]:
    """The checkpoint to resume from: the one ``latest`` names if it is complete and its files are
    all there at their saved sizes, else the newest such one; None when there is no complete one.

    Cheap (stat only), local, no collective: any rank may call it. A skipped checkpoint is named
    with its bad file on rank 0. Raises ``CheckpointError`` when complete checkpoints exist but
    none is usable (never silently restarts a run from step 0). Checksums are verified by
    ``load_checkpoint``. ``weights_only``: only the model weights will be read (export,
    ``train.init_from``): a checkpoint saved before manifests needs no trainer files.
    """
    candidates = _candidates(ckpt_dir)
    skipped = []
    for tag in candidates:
        try:
            problems = quick_problems(ckpt_dir / tag, weights_only)
        except CheckpointError as err:
            problems = [str(err)]
        if not problems:
            if skipped:
                _say(f"resuming from {tag} instead")
            return tag
        skipped.append(f"{tag}: {_describe(problems)}")
        _say(f"checkpoint {ckpt_dir / tag} is unusable and skipped: {_describe(problems)}")
    if skipped:
        remedy = ("restore the files: no checkpoint of this run has intact weights" if weights_only else
                  "restore the files or move the checkpoints folder away to start this run afresh")
        raise CheckpointError(f"{ckpt_dir}: no usable checkpoint ({'; '.join(skipped)}); {remedy}", all_ranks=True)
    return None


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """(checkpoints folder, tag) for a run folder, its ``checkpoints`` folder, a ``latest`` file or
    one checkpoint folder (what ``train.init_from`` may name)."""
    path = Path(path)
    if path.name == "latest" and path.is_file():
        path = path.parent
    if (path / "COMPLETE").exists() and _TAG.match(path.name.removesuffix("_universal")):
        return path.parent, path.name
    for folder in (path, path / "checkpoints"):
        tag = latest_tag(folder, weights_only=True)
        if tag is not None:
            return folder, tag
    raise FileNotFoundError(f"{path}: no complete checkpoint (expected a run folder, its checkpoints folder, "
                            "a 'latest' file or a step_XXXXXXXX folder)")


def read_trainer_state(path: Path) -> dict:
    """A ``trainer_rank{R}.json``; ``CheckpointError`` naming it when it is missing or damaged."""
    try:
        state = json.loads(path.read_bytes().decode())
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("no 'step' entry")
        return state
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete: resume from an earlier one "
                              "(move this folder away)") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: damaged ({type(err).__name__}: {err}); resume from an earlier "
                              "checkpoint (move this folder away)") from None


def saved_layout(folder: Path) -> dict:
    """{dp_size, tp_size, pp_size} a checkpoint was saved with."""
    state = read_trainer_state(folder / "trainer_rank0.json")
    return {key: state.get(key, 1) for key in ("dp_size", "tp_size", "pp_size")}


def layout_change_error(folder: Path, current: dict) -> Optional[str]:
    """The message for resuming a (non-universal) checkpoint in another parallel layout, else None."""
    if folder.name.endswith("_universal"):
        return None
    saved = saved_layout(folder)
    if saved == current:
        return None
    words = lambda d: f"dp {d['dp_size']} x tp {d['tp_size']} x pp {d['pp_size']}"  # noqa: E731
    return (f"{folder}: saved in layout {words(saved)}, this launch is {words(current)}; DeepSpeed cannot "
            f"load it directly: convert it first with `{UNIVERSAL_HINT}` (or launch with the saved layout)")


# ---------------------------------------------------------------------------------------------
# saving
def _rng_state() -> dict:
    return {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}


def _set_rng_state(state: dict) -> None:
    raw = base64.b64decode(state["torch"])
    torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """One fused max-|x| per (device, dtype) group; NaN and Inf propagate through it."""
    groups: dict = {}
    for t in tensors:
        if t.is_floating_point() and t.numel():
            groups.setdefault((t.device, t.dtype), []).append(t.detach())
    for group in groups.values():
        peaks = torch.stack(torch._foreach_norm(group, float("inf")))
        if not bool(torch.isfinite(peaks).all()):
            return False
    return True


def _optimizer_tensors(optimizer) -> list[torch.Tensor]:
    """The optimizer's state (Adam moments) and the tensors it updates (ZeRO's fp32 master partitions)."""
    if optimizer is None:
        return []
    base = getattr(optimizer, "optimizer", optimizer)
    tensors = [v for state in base.state.values() for v in state.values() if torch.is_tensor(v)]
    return tensors + [p for group in base.param_groups for p in group["params"]]


def nonfinite_state(engine, ema) -> list[str]:
    """What of this rank's training state holds a NaN/Inf: names of bad weights (a few), and/or
    'optimizer state', 'EMA'. Empty when all is finite."""
    found = []
    params = list(engine.module.named_parameters())
    if not _all_finite([p for _, p in params]):
        bad = [n for n, p in params if not _all_finite([p])]
        found.append("weights " + ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else ""))
    if not _all_finite(_optimizer_tensors(getattr(engine, "optimizer", None))):
        found.append("optimizer state")
    if ema is not None and not _all_finite(list(ema.shadow.values())):
        found.append("EMA")
    return found


def _rank_errors(runtime, error: Optional[str]) -> list[str]:
    return [f"rank {r}: {e}" for r, e in enumerate(_all_gather_object(runtime, error)) if e]


def save_checkpoint(engine, ckpt_dir: Path, step: int, runtime, ema, loader_state: dict,
                    trainer_state: dict, keep_last: int, vocab_size: int) -> str:
    """Collective: every rank calls it. Returns the tag written.

    Raises ``CheckpointError`` on every rank, leaving ``latest`` and every earlier checkpoint as
    they were, when the state of any rank holds a NaN/Inf (nothing is written) or when a file could
    not be written (e.g. a full disk: the partial folder is removed).
    """
    tag = tag_for(step)
    target = ckpt_dir / tag
    previous = _read_pointer(ckpt_dir) if runtime.rank == 0 else None
    keeps = f"{ckpt_dir / previous} stays the latest checkpoint" if previous else "no earlier checkpoint exists"
    bad = _rank_errors(runtime, ", ".join(nonfinite_state(engine, ema)) or None)
    if bad:
        raise CheckpointError(f"{target}: not saved: non-finite values in {'; '.join(bad)}. {keeps}; "
                              "the run cannot continue from this state: resume from the last checkpoint "
                              "(lower optim.lr or check the data if it happens again)", all_ranks=True)
    if runtime.rank == 0 and target.exists():  # a leftover of an interrupted save of this step
        shutil.rmtree(target)
    _barrier(runtime)
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    from ..convert.llama import deepspeed_sharding_patterns

    error = None
    try:
        # The sharding patterns let ds_to_universal merge tensor-parallel slices (layout changes).
        engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False,
                               client_state={UNIVERSAL_CHECKPOINT_INFO: deepspeed_sharding_patterns(vocab_size)})
    except OSError as err:
        error = f"writing DeepSpeed's files failed: {err}"
        _barrier(runtime)  # the closing barrier DeepSpeed's save did not reach on this rank
    if error is None:
        try:
            if ema is not None:
                save_file({k: v.contiguous() for k, v in ema.shadow.items()}, target / ema_file_name(runtime),
                          metadata={"ema_layout": json.dumps(ema.layout())})
            state = {"step": step, "loader": loader_state, "rng": _rng_state(), "dp_size": runtime.dp_size,
                     "tp_size": runtime.tp_size, "pp_size": runtime.pp_size, **trainer_state}
            (target / f"trainer_rank{runtime.rank}.json").write_text(json.dumps(state))
        except OSError as err:
            error = f"writing {err.filename or target} failed: {err.strerror or err}"
    failed = _rank_errors(runtime, error)  # also the barrier after every rank wrote its files
    if not failed:
        names = _all_gather_object(runtime, listed_files(target) if runtime.rank == 0 else None)[0]
        hashed = _all_gather_object(runtime, hash_share(target, names, runtime.rank, runtime.world_size))
        error = None
        if runtime.rank == 0:
            try:
                files = {name: entry for share in hashed for name, entry in share.items()}
                layout = {"dp_size": runtime.dp_size, "tp_size": runtime.tp_size, "pp_size": runtime.pp_size}
                write_manifest(target, files, {"tag": tag, "step": step, "finite": True, "layout": layout})
                (target / "COMPLETE").write_text("ok\n")
                _atomic_write(ckpt_dir / "latest", tag)
            except OSError as err:
                error = f"writing {err.filename or target} failed: {err.strerror or err}"
        failed = _rank_errors(runtime, error)
    if failed:
        if runtime.rank == 0:
            shutil.rmtree(target, ignore_errors=True)
            if previous is not None:  # latest may already name the removed folder
                _atomic_write(ckpt_dir / "latest", previous)
        _barrier(runtime)
        raise CheckpointError(f"{target}: not saved ({'; '.join(failed)}); the partial folder was removed and "
                              f"{keeps}. Free space in {ckpt_dir} (or fix its permissions) and resume", all_ranks=True)
    if runtime.rank == 0:
        _rotate(ckpt_dir, keep_last)
    _barrier(runtime)
    return tag


def _healthy(folder: Path) -> bool:
    try:
        manifest = read_manifest(folder)
    except CheckpointError:
        return False
    return bool(manifest and manifest.get("finite") and not stat_problems(folder, manifest))


def _rotate(ckpt_dir: Path, keep_last: int) -> None:
    """Delete complete checkpoints older than the ``keep_last`` newest, except the newest healthy one."""
    tags = complete_tags(ckpt_dir)
    keep = set(tags[-keep_last:]) if keep_last > 0 else set(tags)
    newest_healthy = next((t for t in reversed(tags) if _healthy(ckpt_dir / t)), None)
    for old in tags:
        if old not in keep and old != newest_healthy:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# loading
def verify_checkpoint(folder: Path, runtime) -> list[str]:
    """Collective: the problems found with a complete checkpoint, the same list on every rank.
    Every rank stats every file and re-hashes its share of them (``MANIFEST.json``); a checkpoint
    without a manifest (saved before manifests existed) gets the stat checks only."""
    try:
        manifest = read_manifest(folder)
        problems = (quick_problems(folder) if manifest is None
                    else hash_problems(folder, manifest, runtime.rank, runtime.world_size))
    except CheckpointError as err:
        problems = [str(err)]
    return sorted({p for rank_problems in _all_gather_object(runtime, problems) for p in rank_problems})


def _verified_tag(ckpt_dir: Path, tag: str, runtime) -> str:
    """``tag`` if it verifies, else the newest earlier complete checkpoint that does (said on rank 0)."""
    step_of = lambda t: t.removesuffix("_universal")  # noqa: E731
    older = [t for t in _candidates(ckpt_dir) if t != tag and step_of(t) < step_of(tag)]
    skipped = []
    for candidate in [tag] + older:
        problems = verify_checkpoint(ckpt_dir / candidate, runtime)
        if not problems:
            if skipped:
                if candidate.endswith("_universal") != tag.endswith("_universal"):
                    raise CheckpointError(
                        f"{ckpt_dir / tag}: {skipped[0]}; the earlier checkpoint {candidate} needs another engine "
                        f"setup: move {ckpt_dir / tag} away and launch again to resume from it", all_ranks=True)
                _say(f"resuming from {ckpt_dir / candidate} instead (skipped: {'; '.join(skipped)})")
            return candidate
        _say(f"checkpoint {ckpt_dir / candidate} fails verification and is skipped: {_describe(problems)}")
        skipped.append(f"{candidate}: {_describe(problems)}")
    raise CheckpointError(f"{ckpt_dir}: no checkpoint passes verification ({'; '.join(skipped)}); restore the files "
                          "or move the checkpoints folder away to start this run afresh", all_ranks=True)


def load_checkpoint(engine, ckpt_dir: Path, tag: str, runtime, ema, load_optimizer: bool = True) -> dict:
    """Collective. Restore engine (model, optimizer, LR schedule), EMA and RNG; returns this rank's
    trainer state, with ``state["tag"]``: the checkpoint actually loaded (an earlier one when
    ``tag`` fails verification, said on rank 0).

    Before DeepSpeed opens a file: the checksums are verified (every rank a share), the saved
    parallel layout is compared with this one (a change needs ``pretrain.train.universal``) and the
    per-rank files are checked. DeepSpeed's files are unpickled weights-only. Raises
    ``CheckpointError`` naming the checkpoint, the file and what to do.
    """
    tag = _verified_tag(ckpt_dir, tag, runtime)
    target = ckpt_dir / tag
    universal = tag.endswith("_universal")
    current = {"dp_size": runtime.dp_size, "tp_size": runtime.tp_size, "pp_size": runtime.pp_size}
    message = layout_change_error(target, current)
    if message:
        raise CheckpointError(message, all_ranks=True)
    state_path = target / f"trainer_rank{runtime.rank}.json"
    missing = None if state_path.exists() or universal else f"{state_path}: missing"
    missing = _rank_errors(runtime, missing)
    if missing:
        raise CheckpointError(f"{'; '.join(missing)}, although the checkpoint was saved in this layout "
                              f"({runtime.world_size} ranks): it is incomplete; move {target} away to resume "
                              "from the previous checkpoint", all_ranks=True)
    with weights_only_loading():
        try:
            load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=load_optimizer,
                                                  load_lr_scheduler_states=load_optimizer)
        except CheckpointError:
            raise
        except Exception as err:  # DeepSpeed's own checks (shapes, names, ZeRO partitions)
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CheckpointError(f"{target}: DeepSpeed could not load it ({type(err).__name__}: {first}); "
                                  "was it saved with another model or train.trainable?") from err
    if load_path is None:  # DeepSpeed only warns when it finds no model-states file
        raise CheckpointError(f"{target}: DeepSpeed found no model states for this rank; the checkpoint is "
                              "incomplete: move it away to resume from the previous one")
    # After a layout change (universal checkpoint) a rank may have no state of its own, or the file of
    # its rank number belongs to another place in the old layout (another data-parallel rank): the
    # step and counters are the same on every rank, and the data position is replayed by the trainer.
    state = read_trainer_state(state_path if state_path.exists() else target / "trainer_rank0.json")
    state["layout_changed"] = not state_path.exists() or any(
        key in state and state[key] != value for key, value in current.items())
    state["tag"] = tag
    if not state["layout_changed"]:
        _set_rng_state(state["rng"])
    if ema is not None and not _restore_ema(ema, target, runtime):
        state["ema_restarted"] = True  # the averages restart from the current weights
    return state


def _safetensors_error(path: Path, err: Exception) -> CheckpointError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return CheckpointError(f"{path}: unreadable ({type(err).__name__}: {first}); the file is truncated or damaged: "
                           "resume from an earlier checkpoint (move this folder away)")


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file; ``CheckpointError`` naming it when it is damaged."""
    try:
        return load_file(str(path))
    except Exception as err:  # SafetensorError, OSError, ...
        raise _safetensors_error(path, err) from None


def ema_file_name(runtime) -> str:
    return f"ema_mp{runtime.tp_rank}_{runtime.pp_rank}_dp{runtime.dp_rank}.safetensors"


def _read_ema_file(path: Path) -> tuple[dict[str, torch.Tensor], Optional[dict[str, list[int]]]]:
    """(tensors, fragment layout or None for a file of whole tensors); ``CheckpointError`` naming a
    damaged file."""
    from safetensors import safe_open

    from .ema import parse_layout

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, parse_layout(f.metadata())
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise _safetensors_error(path, err) from None


def _restore_ema(ema, folder: Path, runtime) -> bool:
    """This rank's EMA from a checkpoint: its fragments of the full-state EMA of a universal
    checkpoint (any layout), else its own file (same layout); False when nothing fits it."""
    from safetensors import safe_open

    from ..convert.state import full_tensor_names, local_slices

    if (folder / EMA_FULL_FILE).exists():
        names = full_tensor_names(ema.model)
        wanted = {names[k] for k in ema.shadow}
        try:
            with safe_open(str(folder / EMA_FULL_FILE), framework="pt") as f:
                if not wanted <= set(f.keys()):  # e.g. train.trainable changed: nothing to average from
                    return False
                full = {name: f.get_tensor(name) for name in wanted}
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise _safetensors_error(folder / EMA_FULL_FILE, err) from None
        return ema.load_full(local_slices(ema.model, full, ema.shadow, runtime))
    own = folder / ema_file_name(runtime)
    if own.exists():
        tensors, layout = _read_ema_file(own)
        return ema.load_fragments(tensors, layout) if layout is not None else ema.load_full(tensors)
    whole = folder / f"ema_mp{runtime.tp_rank}_{runtime.pp_rank}.safetensors"  # saved before sharding
    return whole.exists() and ema.load_full(load_safetensors(whole))
