"""What a build owns in ``--out`` and what it must check before it trusts earlier work.

- ``input_fingerprints``: (size, mtime, a sampled SHA-256) per input file, stored with the build's
  state and in the manifest. A resume, or a re-run of a finished build, compares them and refuses,
  naming the files, when an input was added, removed, grown or replaced: a chunk plan cut from the
  old files would otherwise silently duplicate or miss records.
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

from .errors import BuildError

_SAMPLE = 1 << 16  # bytes hashed at the start, the middle and the end of a file

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


def describe_changes(old: List[dict], new: List[dict]) -> List[str]:
    """Human-readable differences between two fingerprint lists (empty: unchanged)."""

    def key(e):
        return (e["path"], e["format"], e["task"])

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
                continue
            if e.get("size") != b.get("size"):
                what = f"size {b.get('size')} -> {e.get('size')}"
            elif e.get("sample_sha256") != b.get("sample_sha256"):
                what = "content changed"
            else:
                what = "modification time changed"
            changes.append(f"changed {e['path']} ({what})")
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
