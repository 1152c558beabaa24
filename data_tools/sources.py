"""Input readers: raw records out of webdataset tars, parquet, LLaVA-style JSON and text jsonl.

Every input file is cut into *chunks* (record ranges) when the build is planned; a chunk is the
unit of parallel work and of resumption. A reader yields, for the records of one chunk, in input
order, either a ``RawRecord`` or a ``Reject`` (source, key, reason): a reader never raises for bad
data, so one broken file cannot stop a build, and every record it saw is accounted for.

What counts as one record: a tar key group (all members sharing a key), a parquet row, a JSON
conversation, a non-blank jsonl line. A file that cannot be opened at all counts as one record,
rejected with key ``<file>``; the unreadable tail of a truncated tar counts as one record too.
"""

from __future__ import annotations

import glob
import json
import os
import posixpath
from functools import lru_cache
from typing import Iterator, List, Optional, Union

from datacontract.format import Task

from .records import (
    IMAGE_EXTS,
    TAR_FORMATS,
    Chunk,
    InputSpec,
    RawRecord,
    ReaderOptions,
    Reject,
    json_member_field,
)
from .remote import is_remote

FLAG_OF_FORMAT = {("wds", Task.UNDERSTANDING): "--und-wds", ("wds", Task.GENERATION): "--gen-wds",
                  ("parquet", Task.UNDERSTANDING): "--und-parquet", ("parquet", Task.GENERATION): "--gen-parquet",
                  ("llava", Task.UNDERSTANDING): "--llava", ("jsonl", Task.TEXT): "--text-jsonl",
                  ("classdir", Task.GENERATION): "--gen-class-folder", ("classwds", Task.GENERATION): "--gen-class-wds"}


def flag_of(spec: InputSpec) -> str:
    return FLAG_OF_FORMAT.get((spec.fmt, Task(spec.task)), f"--{spec.fmt}")


def _remote_expanded(spec: InputSpec, flag: str) -> List[str]:
    from .remote import expand_remote
    from .errors import BuildError

    if spec.fmt not in TAR_FORMATS:
        raise BuildError(f"{flag} {spec.pattern!r}: only tar inputs (--und-wds, --gen-wds, --gen-class-wds) may be pipe: commands "
                         "or URLs; copy the file locally")
    return expand_remote(spec.pattern)


def expand_inputs(specs: List[InputSpec]) -> List[tuple]:
    """(spec, path) for every file, in the order given, each glob sorted.

    Raises ``BuildError`` naming the flag when a pattern matches nothing or names a folder. The same
    file given twice for the same task is read once; for two tasks it is read once per task.
    """
    from .errors import BuildError

    seen, out = set(), []
    for spec in specs:
        flag = flag_of(spec)
        if is_remote(spec.pattern):
            paths = _remote_expanded(spec, flag)
        elif spec.fmt == "classdir":
            if not os.path.isdir(spec.pattern):
                raise BuildError(f"{flag} {spec.pattern}: not a folder; give the root of a class_name/*.jpg tree")
            paths = [spec.pattern]
        elif glob.has_magic(spec.pattern):
            matches = sorted(glob.glob(spec.pattern))
            paths = [p for p in matches if os.path.isfile(p)]
            if not paths:
                extra = f" (only folders: {matches[0]}, ...)" if matches else ""
                raise BuildError(f"{flag} {spec.pattern!r} matches no file{extra}; check the pattern")
        elif os.path.isdir(spec.pattern):
            ext = {"wds": "*.tar", "classwds": "*.tar", "parquet": "*.parquet", "llava": "*.json",
                   "jsonl": "*.jsonl"}[spec.fmt]
            raise BuildError(f"{flag} {spec.pattern} is a folder; give files or a glob such as "
                             f"'{os.path.join(spec.pattern, ext)}'")
        elif not os.path.isfile(spec.pattern):
            raise BuildError(f"{flag} {spec.pattern}: no such file")
        else:
            paths = [spec.pattern]
        for p in paths:
            if (spec.fmt, spec.task, p) not in seen:
                seen.add((spec.fmt, spec.task, p))
                out.append((spec, p))
    return out


def open_input(path: str):
    """A binary stream of one input: a local file, a ``pipe:`` command's output or a URL."""
    if is_remote(path):
        from .remote import open_remote

        return open_remote(path)
    return open(path, "rb")


def _line_offsets(path: str, every: int) -> tuple:
    """(number of lines, byte offset of lines 0, every, 2*every, ...)."""
    offsets, n, pos = [0], 0, 0
    with open(path, "rb") as f:
        for line in f:
            n += 1
            pos += len(line)
            if n % every == 0:
                offsets.append(pos)
    return n, offsets


def plan_chunks(specs: List[InputSpec], chunk_records: int, files: Optional[List[tuple]] = None) -> List[Chunk]:
    """Cut every input file into chunks of at most ``chunk_records`` records, in input order.

    ``files``: the (spec, path) list of ``expand_inputs(specs)`` when already expanded.
    """
    chunks: List[Chunk] = []

    def add(spec, path, start, stop, offset=0):
        chunks.append(Chunk(len(chunks), spec.fmt, spec.task, path, start, stop, offset, spec.image_root))

    for spec, path in (files if files is not None else expand_inputs(specs)):
        if spec.fmt in TAR_FORMATS:
            add(spec, path, 0, 0)
        elif spec.fmt == "classdir":
            from .class_sources import folder_files

            n = len(folder_files(path))
            if n == 0:
                add(spec, path, 0, 0)
            for start in range(0, n, chunk_records):
                add(spec, path, start, min(n, start + chunk_records))
        elif spec.fmt == "parquet":
            try:
                import pyarrow.parquet as pq

                n = pq.ParquetFile(path).metadata.num_rows
            except Exception:
                n = 0  # unreadable: one chunk whose reader reports the file as one reject
            if n == 0:
                add(spec, path, 0, 0)
            for start in range(0, n, chunk_records):
                add(spec, path, start, min(n, start + chunk_records))
        elif spec.fmt == "jsonl" or (spec.fmt == "llava" and path.endswith(".jsonl")):
            n, offsets = _line_offsets(path, chunk_records)
            if n == 0:
                add(spec, path, 0, 0)
            for i, start in enumerate(range(0, n, chunk_records)):
                add(spec, path, start, min(n, start + chunk_records), offsets[i])
        elif spec.fmt == "llava":
            try:
                n = len(_load_json_list(path))
            except Exception:
                n = 0
            if n == 0:
                add(spec, path, 0, 0)
            for start in range(0, n, chunk_records):
                add(spec, path, start, min(n, start + chunk_records))
        else:
            raise ValueError(f"unknown input format {spec.fmt!r}")
    return chunks


def read_chunk(chunk: Chunk, opts: ReaderOptions) -> Iterator[Union[RawRecord, Reject]]:
    if chunk.fmt in TAR_FORMATS:
        yield from _read_wds(chunk, opts)
    elif chunk.fmt == "classdir":
        from .class_sources import read_class_folder

        yield from read_class_folder(chunk, opts)
    elif chunk.fmt == "parquet":
        yield from _read_parquet(chunk, opts)
    elif chunk.fmt == "jsonl":
        yield from _read_jsonl(chunk, opts, _text_record)
    elif chunk.fmt == "llava":
        if chunk.path.endswith(".jsonl"):
            yield from _read_jsonl(chunk, opts, _llava_record)
        else:
            yield from _read_llava_json(chunk, opts)
    else:
        raise ValueError(f"unknown input format {chunk.fmt!r}")


# ----------------------------------------------------------------------------------------- captions


def _decode_caption(raw, source: str, key: str) -> Union[str, Reject]:
    if raw is None:
        return Reject(source, key, "missing_caption")
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            return Reject(source, key, "caption_not_utf8", str(e))
    if not isinstance(raw, str):
        return Reject(source, key, "missing_caption", f"caption is a {type(raw).__name__}")
    text = raw.strip()
    if not text:
        return Reject(source, key, "empty_caption")
    return text


# ----------------------------------------------------------------------------------------- webdataset


def _unsafe_member(name: str) -> bool:
    norm = name.replace("\\", "/")
    return norm.startswith("/") or ".." in norm.split("/")


def _split_key(name: str) -> tuple:
    """webdataset convention: key = path up to the first dot of the base name; rest = extension."""
    dirname, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(dirname, stem), ext.lower()


def _wds_record(chunk: Chunk, opts: ReaderOptions, key: str, members: dict, problem: Optional[tuple]):
    src = chunk.path
    if problem is not None:
        return Reject(src, key, *problem)
    image = next((members[e] for e in IMAGE_EXTS if e in members), None)
    if image is None:
        return Reject(src, key, "missing_image", f"members: {sorted(members)}")
    if chunk.fmt == "classwds":
        from .class_sources import tar_class_record

        return tar_class_record(chunk, opts, key, members, image)
    if opts.wds_caption_ext in members:
        caption = _decode_caption(members[opts.wds_caption_ext], src, key)
    elif "json" in members:
        value = json_member_field(members, opts.json_caption_field, src, key)
        caption = value if isinstance(value, Reject) else _decode_caption(value, src, key)
    else:
        return Reject(src, key, "missing_caption", f"members: {sorted(members)}")
    if isinstance(caption, Reject):
        return caption
    return RawRecord(src, key, chunk.task, images=[image], caption=caption)


def _read_wds(chunk: Chunk, opts: ReaderOptions):
    """Key groups of a tar, in order; every damaged byte range is one more (rejected) record.

    A member that cannot be used makes its whole group a reject with a reason naming the member
    (unsafe path, link, special file, too large); a damage ends the group being read (it is
    rejected ``truncated_archive``/``damaged_archive`` unless already complete) and becomes a
    record of its own, "unreadable remainder after record K".
    """
    from .archive import DIRECTORY, FILE, LINK, TarDamage
    from .archive import iter_tar

    src = chunk.path
    key, members, problem, records = None, {}, None, 0
    after_damage = group_damage = None  # the damage just before the current group (it may have lost members)
    try:
        raw = open_input(src)
    except Exception as e:
        yield Reject(src, "<file>", "unreadable_archive", f"{type(e).__name__}: {e}")
        return
    try:
        items = iter_tar(raw, opts.max_member_bytes)
        while True:
            try:
                item = next(items)
            except StopIteration:
                break
            except Exception as e:  # the stream itself failed (I/O error, a pipe command died)
                item = TarDamage(-1, 0, "unreadable_archive", f"{type(e).__name__}: {e}")
                if key is not None:
                    records += 1
                    yield _group_end(chunk, opts, key, members, problem, item)
                    key = None
                yield _damage_reject(src, item, records)
                return
            if isinstance(item, TarDamage):
                if key is not None:
                    records += 1
                    yield _group_end(chunk, opts, key, members, problem, item)
                    key, members, problem = None, {}, None
                records += 1
                yield _damage_reject(src, item, records - 1)
                after_damage = item
                continue
            if item.kind == DIRECTORY:
                continue
            k, ext = _split_key(item.name)
            if k != key:
                if key is not None:
                    records += 1
                    yield _after_damage(_wds_record(chunk, opts, key, members, problem), group_damage)
                key, members, problem = k, {}, None
                group_damage, after_damage = after_damage, None
            if problem is not None:
                continue
            if _unsafe_member(item.name):
                problem = ("unsafe_path", f"member {item.name!r} is absolute or contains '..'")
            elif item.kind == LINK:
                problem = ("link_member", f"member {item.name!r} is a symbolic or hard link")
            elif item.kind != FILE:
                problem = ("unsupported_member", f"member {item.name!r} is not a regular file")
            elif item.too_large:
                problem = ("member_too_large", f"member {item.name!r} has {item.size} bytes "
                           f"(limit {opts.max_member_bytes})")
            else:
                members[ext] = item.data
        if key is not None:
            records += 1
            yield _after_damage(_wds_record(chunk, opts, key, members, problem), group_damage)
            key = None
        try:
            raw.close()  # a pipe: command that failed raises here
        except Exception as e:
            records += 1
            yield Reject(src, f"<unreadable after record {records - 1}>", "unreadable_archive",
                         f"the input stream failed at its end: {type(e).__name__}: {e}")
    finally:
        try:
            raw.close()
        except Exception:
            pass
    if key is not None:
        yield _after_damage(_wds_record(chunk, opts, key, members, problem), group_damage)
    elif records == 0:
        yield Reject(src, "<file>", "empty_file", "no members")


def _group_end(chunk, opts, key, members, problem, damage):
    """The group being read when damage struck: a record if already complete, else a reject."""
    if problem is None and any(x in members for x in IMAGE_EXTS) and len(members) > 1:
        return _wds_record(chunk, opts, key, members, problem)
    return Reject(chunk.path, key, damage.reason, f"cut by the damage at offset {damage.offset}")


def _after_damage(record, damage):
    """A group right after damaged bytes that lacks its image or caption lost them to the damage."""
    if damage is not None and isinstance(record, Reject) and record.reason in ("missing_image", "missing_caption"):
        return Reject(record.source, record.key, damage.reason,
                      f"members lost in the damage at offset {damage.offset}; left: {record.detail}")
    return record


def _damage_reject(src: str, d, after: int) -> Reject:
    where = f"compressed offset {d.offset}" if d.offset < 0 else f"offset {d.offset}"
    size = f"{d.length} bytes" + (f" ({d.compressed_bytes} compressed bytes)" if d.compressed_bytes else "")
    return Reject(src, f"<unreadable after record {after}>", d.reason,
                  f"unreadable remainder after record {after}, {size} at {where}: {d.detail}")


# ----------------------------------------------------------------------------------------- parquet


def _image_bytes(value):
    if isinstance(value, dict):  # the Hugging Face datasets Image feature: {"bytes", "path"}
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return None


def _read_parquet(chunk: Chunk, opts: ReaderOptions):
    import pyarrow.parquet as pq

    src = chunk.path
    try:
        pf = pq.ParquetFile(src)
        n = pf.metadata.num_rows
    except Exception as e:
        yield Reject(src, "<file>", "unreadable_file", f"{type(e).__name__}: {e}")
        return
    if chunk.stop <= chunk.start:
        if n == 0:
            yield Reject(src, "<file>", "empty_file", "no rows")
        return
    columns = [opts.parquet_image_column, opts.parquet_caption_column]
    if opts.parquet_key_column:
        columns.append(opts.parquet_key_column)
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
        for row in range(chunk.start, chunk.stop):
            yield Reject(src, f"row{row}", "missing_column", f"no column(s) {missing}")
        return
    first = 0
    for rg in range(pf.metadata.num_row_groups):
        rg_rows = pf.metadata.row_group(rg).num_rows
        lo, hi = max(chunk.start, first), min(chunk.stop, first + rg_rows)
        if lo < hi:
            try:
                table = pf.read_row_group(rg, columns=columns).slice(lo - first, hi - lo)
                rows = table.to_pylist()
            except Exception as e:
                for row in range(lo, hi):
                    yield Reject(src, f"row{row}", "unreadable_row_group", f"{type(e).__name__}: {e}")
                rows = []
            for i, row in enumerate(rows):
                index = lo + i
                key = str(row[opts.parquet_key_column]) if opts.parquet_key_column else f"row{index}"
                image = _image_bytes(row[opts.parquet_image_column])
                if image is None:
                    yield Reject(src, key, "missing_image")
                    continue
                caption = _decode_caption(row[opts.parquet_caption_column], src, key)
                if isinstance(caption, Reject):
                    yield caption
                    continue
                yield RawRecord(src, key, chunk.task, images=[image], caption=caption)
        first += rg_rows
        if first >= chunk.stop:
            break


# ----------------------------------------------------------------------------------------- jsonl


def _read_jsonl(chunk: Chunk, opts: ReaderOptions, make_record):
    src = chunk.path
    if chunk.stop <= chunk.start:
        yield Reject(src, "<file>", "empty_file", "no lines")
        return
    with open(src, "rb") as f:
        f.seek(chunk.byte_offset)
        for lineno in range(chunk.start, chunk.stop):
            raw = f.readline()
            if not raw:
                break
            if lineno == 0 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte order mark before the first line
            if not raw.strip():
                continue  # blank lines are not records
            key = f"line{lineno + 1}"
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield Reject(src, key, "not_utf8", str(e))
                continue
            except ValueError as e:
                yield Reject(src, key, "malformed_json", str(e))
                continue
            yield make_record(chunk, opts, obj, key)


def _text_record(chunk: Chunk, opts: ReaderOptions, obj, key: str):
    text = obj.get(opts.text_field) if isinstance(obj, dict) else None
    if not isinstance(text, str):
        return Reject(chunk.path, key, "missing_text", f"no string field {opts.text_field!r}")
    if not text.strip():
        return Reject(chunk.path, key, "empty_text")
    return RawRecord(chunk.path, key, chunk.task, text=text)


# ----------------------------------------------------------------------------------------- llava


@lru_cache(maxsize=2)
def _load_json_list(path: str) -> list:
    with open(path, "rb") as f:
        data = json.loads(f.read().decode("utf-8-sig"))
    if not isinstance(data, list):
        raise ValueError("top level is not a list")
    return data


def _read_llava_json(chunk: Chunk, opts: ReaderOptions):
    try:
        items = _load_json_list(chunk.path)
    except Exception as e:
        yield Reject(chunk.path, "<file>", "unreadable_file", f"{type(e).__name__}: {e}")
        return
    if not items:
        yield Reject(chunk.path, "<file>", "empty_file", "empty list")
        return
    for index in range(chunk.start, min(chunk.stop, len(items))):
        yield _llava_record(chunk, opts, items[index], f"item{index}")


_HUMAN, _ASSISTANT = ("human", "user"), ("gpt", "assistant")


def _llava_record(chunk: Chunk, opts: ReaderOptions, obj, key: str):
    src = chunk.path
    if not isinstance(obj, dict):
        return Reject(src, key, "bad_conversation", "record is not an object")
    if isinstance(obj.get("id"), (str, int)):
        key = f"{key}:{obj['id']}"
    conv = obj.get(opts.llava_conversations_field)
    if not isinstance(conv, list) or not conv:
        return Reject(src, key, "bad_conversation", "no conversation")
    turns, question = [], None
    for i, msg in enumerate(conv):
        if not isinstance(msg, dict) or not isinstance(msg.get("value"), str):
            return Reject(src, key, "bad_conversation", f"message {i} has no string 'value'")
        role = str(msg.get("from", "")).lower()
        if question is None and role in _HUMAN:
            question = msg["value"]
        elif question is not None and role in _ASSISTANT:
            if opts.image_marker in msg["value"]:
                return Reject(src, key, "image_marker_mismatch", "image marker in an answer")
            if not msg["value"].strip():
                return Reject(src, key, "empty_answer", f"message {i}")
            turns.append((question, msg["value"]))
            question = None
        else:
            return Reject(src, key, "bad_conversation", f"message {i}: role {role!r} out of order")
    if question is not None:
        return Reject(src, key, "bad_conversation", "ends with an unanswered question")
    image_field = obj.get(opts.llava_image_field)
    paths = [] if image_field is None else ([image_field] if isinstance(image_field, str) else image_field)
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        return Reject(src, key, "bad_conversation", f"field {opts.llava_image_field!r} is not a path list")
    markers = sum(q.count(opts.image_marker) for q, _ in turns)
    if markers != len(paths):
        return Reject(src, key, "image_marker_mismatch", f"{markers} markers, {len(paths)} images")
    root = chunk.image_root or os.path.dirname(src)
    images = []
    for p in paths:
        if os.path.isabs(p) or ".." in p.replace("\\", "/").split("/"):
            return Reject(src, key, "unsafe_path", p)
        full = os.path.join(root, p)
        try:
            size = os.path.getsize(full)
            if size > opts.max_member_bytes:
                return Reject(src, key, "member_too_large", f"{full}: {size} bytes (limit {opts.max_member_bytes})")
            with open(full, "rb") as f:
                images.append(f.read())
        except OSError as e:
            return Reject(src, key, "missing_image_file", f"{full}: {e.strerror or e}")
    return RawRecord(src, key, chunk.task, images=images, turns=turns)
