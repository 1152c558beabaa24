"""What the two CPU demos check of their output folder before any work: ``pretrain.demo`` (JanusFlow,
``make demo``) and ``pretrain.januspro_demo`` (Janus-Pro, scripts/januspro_cpu_demo.sh).

Both demos skip a stage whose output exists, so a re-run resumes; these checks keep them from
resuming from outputs that no longer fit (made from other raw files, trained on another number of
processes or past the steps asked for, damaged) and from starting in a folder that cannot take
them. Each refusal is one line that says what to remove or which option to give; the demos differ
only in how their options are spelt ("--nproc 2" vs "NPROC=2"), which the callers pass in.

Only the standard library at import time: ``python -m pretrain.januspro_demo`` must be able to say
"cannot import this project's packages" from a Python without torch.
"""

from __future__ import annotations

import glob
import json
import shlex
from pathlib import Path

# The training files a data set's shards (and the Janus-Pro demo's codec) are made from.
INPUT_PATTERNS = ("gen-*.tar", "und-*.tar", "qa.json", "text.jsonl")


class StaleOutput(Exception):
    """OUT holds a data set, codec, shards or a training run made with other settings (an older demo,
    other options, an edited recipe) or a damaged file of them: its message is one line that says what
    to do."""


# ------------------------------------------------------------------------------- the output folder


def check_out(out: Path, named: str) -> str | None:
    """Why OUT cannot take the demo's files (a file, under a file, not writable), else None: found
    before any work, not as a traceback once the first stage writes there. ``named``: OUT as the
    demo's user gave it ("--out /x", "OUT=/x"), the start of the message. Makes OUT."""
    if out.exists() and not out.is_dir():
        return f"{named}: is a file, not a folder; give a folder (it is made if missing)"
    if glob.has_magic(str(out)):
        # DeepSpeed finds a checkpoint's files with a glob of its folder (and data_tools build its
        # inputs): a run there could not be resumed, or read another folder's files.
        return (f"{named}: holds one of the characters [ * ?, which DeepSpeed's checkpoint loading reads as "
                "a pattern; give a folder without them")
    probe = out / ".demo_write_probe"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        return f"{named}: cannot write there ({err.strerror or err}); give a writable folder"
    return None


def fitting_nproc(recipe) -> list[int]:
    """The process counts the recipe's batch can be split over (``Recipe.validate_world``)."""
    from pretrain.model.config import ConfigError

    fits = []
    for n in range(1, recipe.parallel.global_batch_size + 1):
        try:
            recipe.validate_world(n)
            fits.append(n)
        except ConfigError:
            pass
    return fits


def yaml_text(path: Path) -> str:
    """A path as a ``--set`` value: a JSON string is a YAML one, so ' #' or ': ' in OUT stay part of
    it (bare, "/a #b" was read as "/a" and "/a: b" as a mapping)."""
    return json.dumps(str(path))


# ------------------------------------------------------------------------------------ the data set


def data_set_damage(raw: Path) -> str | None:
    """What is wrong with the held-out split and the tokenizer of ``raw``, a finished synth output,
    as "<file>: <what>" (each demo adds its own advice), else None. Both are read only after the
    training, by the sampling: a damaged or removed one was a traceback there."""
    from datacontract.tokenizer import load_tokenizer
    from pretrain.evaluate import load_eval

    try:
        load_eval(str(raw / "heldout"))
    except (OSError, ValueError) as err:  # "<file>: <what is wrong>; <evaluate's own advice>"
        return str(err).partition("; ")[0]
    tokenizer = raw / "tokenizer"
    if not tokenizer.is_dir():
        return f"{tokenizer} is missing"
    try:
        load_tokenizer(str(tokenizer))
    except (OSError, ValueError) as err:  # "<file>: <what is wrong>: <its own advice>"
        return str(err).partition(": re-create")[0]
    return None


def input_fingerprints(train_dir: Path) -> dict[str, tuple[int, int]]:
    """{name: (size, mtime_ns)} of the training files in ``train_dir`` (``INPUT_PATTERNS``). By name,
    so a moved or copied OUT still matches; size and modification time, as ``data_tools build``
    compares them before it reuses a build."""
    return {path.name: (path.stat().st_size, path.stat().st_mtime_ns)
            for pattern in INPUT_PATTERNS for path in sorted(train_dir.glob(pattern))}


def differences(was: dict, now: dict) -> list[str]:
    """How the files ``now`` ({name: (size, mtime_ns)}) differ from those an output was made from
    (``was``): gone, new, then changed; empty when they are the same."""
    changed = [f"{name} is gone" for name in was if name not in now]
    changed += [f"{name} is new" for name in now if name not in was]
    changed += [f"{name} changed" for name, fingerprint in now.items()
                if name in was and tuple(was[name]) != tuple(fingerprint)]
    return changed


def changed_inputs(fingerprints: list, train_dir: Path) -> list[str]:
    """How the files in ``train_dir`` differ from those the shards were packed from (the manifest's
    ``input_fingerprints``; empty: the same). Entries of task -1 (the image codec of Janus-Pro
    shards, the tokenizer, a VAE) are no training files and are left out."""
    packed = {Path(entry["path"]).name: (entry["size"], entry["mtime_ns"])
              for entry in fingerprints if entry.get("task") != -1}
    return differences(packed, input_fingerprints(train_dir))


def listed(changes: list[str]) -> str:
    """The first three changes of ``differences``, for a one-line message."""
    return "; ".join(changes[:3]) + ("; ..." if len(changes) > 3 else "")


# --------------------------------------------------------------------------------- the training run


def latest_run(out: Path) -> tuple[Path, dict] | None:
    """(folder, trainer state of rank 0) of the checkpoint in OUT/train that a training would resume,
    or None; ``StaleOutput`` for a damaged one (its message says which file and what to do)."""
    from pretrain.train.checkpoint import latest_tag, read_trainer_state
    from pretrain.train.safe_load import CheckpointError

    ckpt = out / "train" / "checkpoints"
    try:
        tag = latest_tag(ckpt)
        return None if tag is None else (ckpt / tag, read_trainer_state(ckpt / tag / "trainer_rank0.json"))
    except CheckpointError as err:
        raise StaleOutput(str(err)) from None


def check_resume(out: Path, nproc: int, total: int, *, nproc_option: str = "--nproc {nproc}",
                 steps_option: str = "--steps {step} (or more)") -> int | None:
    """The run in OUT/train that the training would resume fits these options: the step it is at
    (None: no run yet); ``StaleOutput`` otherwise. A run trained on another number of processes
    failed under torchrun with advice for other launchers; one trained past ``total`` steps trained
    nothing, and the demo reported the older, longer run's figures as those of ``total`` steps.
    ``nproc_option``/``steps_option``: the options that would continue it, as the demo spells them
    (formatted with nproc=, step= and total=)."""
    run = latest_run(out)
    if run is None:
        return None
    checkpoint, state = run
    start_afresh = f"or remove it (rm -rf {shlex.quote(str(out / 'train'))}) to train afresh"
    trained_on = state.get("dp_size", 1)  # the demos' recipes have no tensor or pipeline parallelism
    if trained_on != nproc and not checkpoint.name.endswith("_universal"):  # universal: loads in any layout
        give = nproc_option.format(nproc=trained_on, step=state["step"], total=total)
        raise StaleOutput(f"{checkpoint} was trained on {trained_on} process{'es' if trained_on > 1 else ''}: give "
                          f"{give} to continue it, {start_afresh} on {nproc}")
    if state["step"] > total:
        give = steps_option.format(nproc=trained_on, step=state["step"], total=total)
        raise StaleOutput(f"{checkpoint} is a run trained to step {state['step']}, past the {total} steps asked for: "
                          f"give {give} to continue it, {start_afresh}")
    return state["step"]

