"""What a build owns in ``--out`` and what it must check before it trusts earlier work.

- ``input_fingerprints``: (size, mtime, a sampled SHA-256) per input file, stored with the build's
  state and in the manifest. A resume, or a re-run of a finished build, compares them and refuses,
  naming the files, when an input was added, removed, grown or replaced: a chunk plan cut from the
  old files would otherwise silently duplicate or miss records.
- ``tokenizer_fingerprint`` / ``vae_fingerprint``: the tokenizer folder (full SHA-256 of each file)
  and the VAE folder (``fingerprint`` of its config and weights) as entries of task -1 in the same
  list: other token ids or other latents would mix two data sets in one build just as silently.
- ``FolderLock``: one build per ``--out`` at a time (an advisory ``flock``, released by the kernel
  when the process dies, so a kill -9 never leaves a stale lock).
- ``OWNED``: the only file names the tool ever deletes. Anything else in ``--out`` (notes, other
  tools' files) is left alone, with or without ``--overwrite``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
from typing import Dict, List, Optional

from datacontract.tokenizer import TOKENIZER_CONTENT_FILES

from .errors import BuildError

_SAMPLE = 1 << 16  # bytes hashed at the start, the middle and the end of a file

# Fingerprinted folders that are no data input (``task`` -1), by ``format``, with the word that
# names them in messages. They are compared by the files they hold, whatever their path (the build
# config holds the path), and only when both lists have them: builds made before they were
# fingerprinted recorded only the path, and must still resume.
FOLDER_KINDS = {"tokenizer": "tokenizer", "vae": "VAE"}

# File names a build writes (and therefore may delete), per folder kind.
OWNED = {
    "task": re.compile(r"^shard-\d{5}\.arrow(\.tmp)?$"),
    "docs": re.compile(r"^chunk-\d{6}\.(arrow|rejects\.jsonl|json)(\.tmp)?$"),
    "shards": re.compile(r"^(und|gen|text)-\d{5}\.json(\.tmp)?$"),
    "work": re.compile(r"^(config|inputs)\.json(\.tmp)?$"),
    "root": re.compile(r"^(manifest\.json|rejects\.jsonl)(\.tmp)?$"),
}


def fingerprint(path: str) -> dict:
    """Size, mtime and a SHA-256 of the first, middle and last 64 KiB (cheap even for huge tars)."""
    st = os.stat(path)
    h = hashlib.sha256(str(st.st_size).encode())
    with open(path, "rb") as f:
        for pos in sorted({0, max(0, st.st_size // 2 - _SAMPLE // 2), max(0, st.st_size - _SAMPLE)}):
            f.seek(pos)
            h.update(f.read(_SAMPLE))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sample_sha256": h.hexdigest()}


def input_fingerprints(files: List[tuple]) -> List[dict]:
    """One entry per (spec, path) of ``sources.expand_inputs``, in build order."""
    out = []
    for spec, path in files:
        entry = {"path": path, "format": spec.fmt, "task": int(spec.task)}
        entry.update(source_fingerprint(path))
        out.append(entry)
    return out


def source_fingerprint(path: str) -> dict:
    from .remote import is_remote

    if is_remote(path):
        from .remote import remote_fingerprint

        return remote_fingerprint(path)
    if os.path.isdir(path):  # a class-labelled image folder
        from .class_sources import folder_fingerprint

        return folder_fingerprint(path)
    return fingerprint(path)


def tokenizer_fingerprint(path: str) -> dict:
    """The tokenizer folder as a fingerprint entry: a full SHA-256 of each tokenizer file it holds
    (small files, and one changed merge changes the token ids). Content only, so a copy of the same
    tokenizer elsewhere, with other modification times, is the same tokenizer."""
    files = {}
    for name in TOKENIZER_CONTENT_FILES:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file, "rb") as f:
                files[name] = hashlib.sha256(f.read()).hexdigest()
    return {"path": path, "format": "tokenizer", "task": -1, "files": files}


def vae_fingerprint(path: str) -> dict:
    """The VAE folder as a fingerprint entry: ``fingerprint`` of its config and of every weight file
    diffusers may load (hundreds of MB: sampled, as the data inputs are)."""
    names = sorted(n for n in os.listdir(path) if n == "config.json" or n.startswith("diffusion_pytorch_model"))
    files = {n: fingerprint(os.path.join(path, n)) for n in names if os.path.isfile(os.path.join(path, n))}
    return {"path": path, "format": "vae", "task": -1, "files": files}


def _what_changed(before, after) -> str:
    """How one file's fingerprint changed: a ``fingerprint`` dict, or a full SHA-256 string."""
    if not isinstance(before, dict) or not isinstance(after, dict):
        return "content changed"
    if after.get("size") != before.get("size"):
        return f"size {before.get('size')} -> {after.get('size')}"
    if after.get("sample_sha256") != before.get("sample_sha256"):
        return "content changed"
    return "modification time changed"


def file_changes(before: dict, after: dict) -> List[str]:
    """How the files of a fingerprinted folder (``{name: fingerprint}``) changed, one phrase per file."""
    changes = []
    for name in sorted(set(before) | set(after)):
        if name not in before:
            changes.append(f"{name} added")
        elif name not in after:
            changes.append(f"{name} removed")
        elif before[name] != after[name]:
            changes.append(f"{name} {_what_changed(before[name], after[name])}")
    return changes


def nearest_existing(path: str) -> str:
    """``path`` made absolute, or the nearest folder above it that exists: where a tool that makes
    ``path`` will write first (lexists: a link to nothing is an obstacle, not a missing folder)."""
    found = os.path.abspath(path)
    while not os.path.lexists(found):
        found = os.path.dirname(found)
    return found


def describe_changes(old: List[dict], new: List[dict]) -> List[str]:
    """Human-readable differences between two fingerprint lists (empty: unchanged)."""

    def key(e):
        if e["format"] in FOLDER_KINDS:  # one per build, known by its files (see FOLDER_KINDS)
            return (e["format"], e["task"])
        return (e["path"], e["format"], e["task"])

    in_both = {key(e) for e in old} & {key(e) for e in new}
    old = [e for e in old if e["format"] not in FOLDER_KINDS or key(e) in in_both]
    new = [e for e in new if e["format"] not in FOLDER_KINDS or key(e) in in_both]
    before: Dict[tuple, dict] = {key(e): e for e in old}
    after: Dict[tuple, dict] = {key(e): e for e in new}
    changes = []
    for k, e in after.items():
        if k not in before:
            changes.append(f"added {e['path']}")
        elif e != before[k]:
            b = before[k]
            if e.get("format") == "codec":
                changes.append(f"changed image codec {e['path']} (fingerprint {str(b.get('fingerprint'))[:12]} -> "
                               f"{str(e.get('fingerprint'))[:12]})")
            elif e["format"] in FOLDER_KINDS:
                files = file_changes(b.get("files") or {}, e.get("files") or {})
                if files:  # else only the path differs: the same files elsewhere
                    changes.append(f"changed {FOLDER_KINDS[e['format']]} {e['path']} ({', '.join(files)})")
            else:
                changes.append(f"changed {e['path']} ({_what_changed(b, e)})")
    changes += [f"removed {e['path']}" for k, e in before.items() if k not in after]
    if not changes and [key(e) for e in old] != [key(e) for e in new]:
        changes.append("the input order changed")
    return changes


class FolderLock:
    """An exclusive lock on ``OUT/.lock``; raises ``BuildError`` if another build holds it."""

    def __init__(self, out: str) -> None:
        self.path = os.path.join(out, ".lock")
        self.fd: Optional[int] = None

    def __enter__(self) -> "FolderLock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "?"
            finally:
                os.close(self.fd)
                self.fd = None
            raise BuildError(f"another build is running in {os.path.dirname(self.path)} (pid {holder}); "
                             "wait for it to finish or use another --out") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock; the file itself stays (harmless)
            self.fd = None


def remove_owned(folder: str, kind: str, keep: frozenset = frozenset()) -> List[str]:
    """Delete the files in ``folder`` that a build writes (``OWNED[kind]``), except ``keep``."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        if name not in keep and OWNED[kind].match(name) and os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
            removed.append(name)
    return removed


def owned_files(folder: str, kind: str) -> List[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder) if OWNED[kind].match(n))


def remove_dir_if_empty(folder: str) -> None:
    try:
        os.rmdir(folder)
    except OSError:
        pass
