"""Reading checkpoint files safely: no code runs while unpickling, and what is read is what was saved.

Two guards, both applied before a byte of a checkpoint reaches the model:

* **Weights-only unpickling.** DeepSpeed unpickles its ``.pt`` files without the weights-only restriction,
  so a crafted file runs code on resume or conversion. ``weights_only_loading()`` routes every
  ``torch.load`` made inside it (DeepSpeed's checkpoint engine, its universal-checkpoint loader,
  ``ds_to_universal``) through ``load_torch_file``: ``weights_only=True`` with only the few plain
  DeepSpeed types its files hold allow-listed (``DEEPSPEED_SAFE_GLOBALS``). Anything else is refused
  with the file and the global it named.
* **Checksums.** ``MANIFEST.json`` in each checkpoint lists every file with its size and SHA-256
  (written at save, after every rank wrote its files). ``stat_problems`` checks sizes (cheap: what
  ``latest_tag`` runs on every rank); ``hash_problems`` re-hashes a share of the files (each rank a
  share at load).

Every failure is a ``CheckpointError`` whose message names the checkpoint folder, the file and
what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Optional

import torch

MANIFEST_FILE = "MANIFEST.json"
MANIFEST_FORMAT = 1
# Written by us next to the manifest or after it: never listed in it.
UNLISTED = ("COMPLETE", MANIFEST_FILE)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder/file and the fix.

    ``all_ranks``: every rank raised it (a verdict gathered over the ranks), so one rank may say it.
    """

    def __init__(self, message: str, all_ranks: bool = False) -> None:
        super().__init__(message)
        self.all_ranks = all_ranks


def _deepspeed_safe_globals() -> list:
    """The non-tensor types DeepSpeed 0.19 pickles into its checkpoint files: plain data holders
    (a dataclass of two ints, a loss-scaler record, an enum). None of them runs code when rebuilt."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, LossScaler, DynamicLossScaler, ZeroStageEnum]


_original_torch_load = torch.load


def load_torch_file(path, map_location=None, **kwargs):
    """``torch.load`` with ``weights_only=True`` and DeepSpeed's plain types allowed; a file that
    is not a readable checkpoint (truncated, empty, foreign or crafted) raises ``CheckpointError``
    naming it. ``weights_only`` passed by the caller is ignored: it is always True."""
    kwargs.pop("weights_only", None)
    name = str(path) if isinstance(path, (str, os.PathLike)) else repr(path)
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return _original_torch_load(path, map_location=map_location, weights_only=True, **kwargs)
    except FileNotFoundError as err:
        raise CheckpointError(f"{name}: missing ({err.strerror}); the checkpoint is incomplete") from None
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad bytes
        text = str(err).strip().splitlines()
        if "Unsupported global" in str(err) or "Weights only load failed" in str(err):
            culprit = next((line for line in text if "Unsupported global" in line or "GLOBAL" in line), text[0])
            raise CheckpointError(
                f"{name}: refused to unpickle it: it asks for code outside the tensors and DeepSpeed types a "
                f"checkpoint holds ({culprit.strip()}); it was not written by this trainer (crafted or "
                "foreign): do not use this run folder") from None
        reason = text[0] if text else type(err).__name__
        raise CheckpointError(f"{name}: unreadable ({type(err).__name__}: {reason}); the file is truncated or "
                              "damaged: resume from an earlier checkpoint (move this folder away)") from None


@contextlib.contextmanager
def weights_only_loading():
    """Inside it, every ``torch.load`` (DeepSpeed's included) is ``load_torch_file``.

    Not thread-safe by design: loading a checkpoint is the only thing the process does meanwhile.
    """
    previous = torch.load
    torch.load = load_torch_file
    try:
        yield
    finally:
        torch.load = previous


# ---------------------------------------------------------------------------------------------
# checksums
def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def listed_files(folder: Path) -> list[str]:
    """Every file under ``folder`` (relative POSIX paths, sorted) that a manifest lists."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name not in UNLISTED and not p.name.endswith(".tmp"))


def hash_share(folder: Path, names: list[str], share: int, shares: int) -> dict[str, dict]:
    """{name: {bytes, sha256}} for the files ``share`` of ``shares`` hashes (every shares-th file)."""
    return {name: {"bytes": (folder / name).stat().st_size, "sha256": file_digest(folder / name)}
            for name in names[share::shares]}


def write_manifest(folder: Path, files: dict[str, dict], extra: dict) -> None:
    """Atomically write ``MANIFEST.json`` (rank 0, after every file of the checkpoint is written)."""
    text = json.dumps({"format": MANIFEST_FORMAT, **extra, "files": dict(sorted(files.items()))}, indent=1)
    tmp = folder / (MANIFEST_FILE + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, folder / MANIFEST_FILE)


def read_manifest(folder: Path) -> Optional[dict]:
    """The checkpoint's manifest; None for a checkpoint saved before manifests existed."""
    path = folder / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_bytes().decode())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ValueError("no 'files' table")
        for name, entry in manifest["files"].items():
            # Every reader indexes entries by these two keys: a damaged entry is this file's fault.
            if not (isinstance(entry, dict) and type(entry.get("bytes")) is int and isinstance(entry.get("sha256"), str)):
                raise ValueError(f"entry {name!r} is not {{'bytes': int, 'sha256': str}}")
        return manifest
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: damaged manifest ({err}); this checkpoint cannot be verified: "
                              "resume from an earlier one (move this folder away)") from None


def stat_problems(folder: Path, manifest: dict, names: Optional[Iterable[str]] = None) -> list[str]:
    """Files of the manifest (or just ``names``) that are missing or have the wrong size."""
    problems = []
    for name in names if names is not None else manifest["files"]:
        entry = manifest["files"].get(name)
        path = folder / name
        if entry is None:
            problems.append(f"{path}: not in the checkpoint's manifest")
        elif not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, {entry['bytes']} when saved (truncated or damaged)")
    return problems


def hash_problems(folder: Path, manifest: dict, share: int = 0, shares: int = 1,
                  names: Optional[Iterable[str]] = None) -> list[str]:
    """Size or SHA-256 mismatches among this share of the manifest's files (or of ``names``)."""
    selected = sorted(names if names is not None else manifest["files"])[share::shares]
    problems = stat_problems(folder, manifest, selected)
    if problems:
        return problems
    return [f"{folder / name}: checksum differs from the one written at save (damaged bytes)"
            for name in selected if file_digest(folder / name) != manifest["files"][name]["sha256"]]
