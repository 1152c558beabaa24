"""Class-labelled images (ImageNet-style) as generation documents whose prompt is the class name.

Janus-Pro's stage 1 trains image generation on ImageNet with the class names as prompts. Two inputs:

- a folder tree ``ROOT/class_name/.../*.jpg`` (``--gen-class-folder ROOT``): one record per file
  below ROOT, in sorted path order; the class is the first-level folder, its name the folder name
  with underscores as spaces (``golden_retriever`` -> "golden retriever") unless ``--class-names``
  maps it. Files directly in ROOT have no class (``missing_class``); files that are not images, or
  not regular files (a pipe or device would block the read: ``unsupported_member``), links
  (``link_member``, never followed out of the tree), files above ``--max-member-mb``
  (``member_too_large``), unreadable files and folders that cannot be listed (``unreadable_file``)
  are rejected.
- webdataset tars (``--gen-class-wds``) whose key groups hold an image and the class, in a member
  (``KEY.cls``, ``--wds-class-ext``) or a field of ``KEY.json`` (``--json-class-field``); the class
  is a name, or an id that ``--class-names`` maps (an id without a map is ``unknown_class``). A json
  field that is absent or null is ``missing_class``; one of another type (a float, a list) is
  ``unknown_class``, naming the value.

``--class-names FILE.json``: a JSON object {folder or class id: name} or a list of names (index =
class id). With a map, a class it does not name is rejected ``unknown_class``. A map that names no
class, a key given twice, or an entry that is not a string is refused before the build starts.
Several classes may share a name (ImageNet has two "crane" classes).
"""

from __future__ import annotations

import json
import os
import stat
from functools import lru_cache
from typing import Iterator, List, Optional, Union

from .records import IMAGE_EXTS, Chunk, RawRecord, ReaderOptions, Reject, json_member_field


def _refuse_repeated_keys(pairs: list) -> dict:
    """json ``object_pairs_hook``: a key given twice would silently name its class by the last one."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"class {key!r} is given twice ({seen[key]!r} and {value!r}): keep one")
        seen[key] = value
    return seen


def load_class_names(path: str) -> dict:
    """{class key: name} from ``--class-names``; raises ``ValueError`` naming what is wrong."""
    with open(path, "rb") as f:
        text = f.read().decode("utf-8-sig")
    if not text.strip():
        raise ValueError("the file is empty: expected a JSON object {folder or class id: name} or a list of names")
    try:
        data = json.loads(text, object_pairs_hook=_refuse_repeated_keys)
    except RecursionError:  # not a ValueError: it would end the build as a traceback
        raise ValueError("not valid JSON (nested too deeply)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if isinstance(data, list):
        data = {str(i): name for i, name in enumerate(data)}
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object {{folder or class id: name}} or a list of names, "
                         f"got {type(data).__name__}")
    for key, name in data.items():
        if not isinstance(name, str):
            raise ValueError(f"class {key!r}: the name must be a string, got {json.dumps(name)[:80]}")
    if not data:
        # Every record would be rejected unknown_class, which the build says only once all is read.
        raise ValueError("names no class: give at least one {folder or class id: name}")
    return {str(k): v for k, v in data.items()}


def class_name(label: str, opts: ReaderOptions) -> Union[str, tuple]:
    """The prompt of class ``label`` (a folder name or a tar's class value), or (reason, detail)."""
    label = label.strip()
    if opts.class_names is not None:
        name = opts.class_names.get(label)
        if name is None:
            return "unknown_class", f"class {label!r} is not in --class-names"
    elif label.lstrip("-").isdigit():
        return "unknown_class", f"class id {label} has no name: give --class-names"
    else:
        name = label.replace("_", " ")
    name = " ".join(name.split())
    return name if name else ("empty_caption", f"class {label!r} has an empty name")


# ------------------------------------------------------------------------------------------ folders


@lru_cache(maxsize=4)
def folder_files(root: str) -> tuple:
    """Every file below ``root`` (relative paths, sorted; links listed, never followed)."""
    out: List[str] = []

    def unlisted(error: OSError) -> None:
        # os.walk skips a folder it cannot list without a word: listed as a record, rejected below.
        out.append(os.path.relpath(error.filename, root) if error.filename else ".")

    for folder, dirs, names in os.walk(root, onerror=unlisted, followlinks=False):
        dirs.sort()
        rel = os.path.relpath(folder, root)
        out += [n if rel == "." else os.path.join(rel, n) for n in names]
        # A linked folder is listed as a record (rejected below), not entered.
        out += [os.path.join(rel, d) if rel != "." else d for d in dirs if os.path.islink(os.path.join(folder, d))]
    return tuple(sorted(out))


def folder_fingerprint(root: str) -> dict:
    """A folder input's identity: its file list with sizes and modification times."""
    import hashlib

    h = hashlib.sha256()
    size, mtime = 0, 0
    for rel in folder_files.__wrapped__(root):
        st = os.lstat(os.path.join(root, rel))
        size += st.st_size
        mtime = max(mtime, st.st_mtime_ns)
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return {"size": size, "mtime_ns": mtime, "sample_sha256": h.hexdigest()}


def _folder_record(root: str, rel: str, chunk: Chunk, opts: ReaderOptions) -> Union[RawRecord, Reject]:
    parts = rel.replace("\\", "/").split("/")
    path = os.path.join(root, rel)
    if os.path.isdir(path) and not os.path.islink(path):  # only listed when os.walk could not list it
        try:
            os.listdir(path)
            detail = "the folder could not be listed when the build started"
        except OSError as e:
            detail = f"a folder that cannot be listed: {type(e).__name__}: {e.strerror or e}"
        return Reject(root, rel, "unreadable_file", detail + "; its files are not read")
    if len(parts) < 2:
        return Reject(root, rel, "missing_class", "the file is not inside a class folder")
    if os.path.islink(path):
        return Reject(root, rel, "link_member", "a symbolic link (links are not followed)")
    if parts[-1].rpartition(".")[2].lower() not in IMAGE_EXTS:
        return Reject(root, rel, "unsupported_member", "not an image file (by its extension)")
    name = class_name(parts[0], opts)
    if isinstance(name, tuple):
        return Reject(root, rel, *name)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):  # opening a pipe waits for a writer: the build would hang here
            return Reject(root, rel, "unsupported_member", "not a regular file (a pipe, socket or device)")
        size = st.st_size
        if size > opts.max_member_bytes:
            return Reject(root, rel, "member_too_large", f"{size} bytes (limit {opts.max_member_bytes})")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return Reject(root, rel, "unreadable_file", f"{type(e).__name__}: {e.strerror or e}")
    return RawRecord(root, rel, chunk.task, images=[data], caption=name)


def read_class_folder(chunk: Chunk, opts: ReaderOptions) -> Iterator[Union[RawRecord, Reject]]:
    files = folder_files(chunk.path)
    if not files:
        yield Reject(chunk.path, "<folder>", "empty_file", "no files")
        return
    for rel in files[chunk.start:chunk.stop]:
        yield _folder_record(chunk.path, rel, chunk, opts)


# ------------------------------------------------------------------------------------------ tars


def tar_class_record(chunk: Chunk, opts: ReaderOptions, key: str, members: dict,
                     image: bytes) -> Union[RawRecord, Reject]:
    """A class-labelled tar key group (its image already found) -> record or reject."""
    src = chunk.path
    label: Optional[str] = None
    if opts.wds_class_ext in members:
        try:
            label = members[opts.wds_class_ext].decode("utf-8-sig")
        except UnicodeDecodeError as e:
            return Reject(src, key, "caption_not_utf8", f"class member: {e}")
    elif "json" in members:
        value = json_member_field(members, opts.json_class_field, src, key)
        if isinstance(value, Reject):
            return value
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            label = str(value)
        elif value is not None:  # present but unusable: saying "no field" would send the user looking for it
            return Reject(src, key, "unknown_class",
                          f"json field {opts.json_class_field!r} is {json.dumps(value)[:80]} "
                          f"({type(value).__name__}): expected a class name or a whole-number class id")
    if label is None:
        return Reject(src, key, "missing_class",
                      f"no .{opts.wds_class_ext} member or json field {opts.json_class_field!r}; "
                      f"members: {sorted(members)}")
    name = class_name(label, opts)
    if isinstance(name, tuple):
        return Reject(src, key, *name)
    return RawRecord(src, key, chunk.task, images=[image], caption=name)
