"""The build's units of work, run in worker processes (or inline with one worker): phase 1 turns
one input chunk into a document file, phase 2 packs documents into one shard (``build.py`` plans
both and runs them; its docstring describes the resumable layout these files follow).

Each unit writes under a temporary name, renames into place, then writes its done marker: a unit
killed at any point leaves nothing that a re-run would take for finished work.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import signal
from collections import Counter
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa

from datacontract.format import (
    COL_GEN_IMAGES,
    COL_GEN_LATENTS,
    COL_INPUT_IDS,
    COL_TARGET_MASK,
    COL_TOKEN_KIND,
    COL_UND_IMAGES,
    Task,
    TokenKind,
)
from datacontract.shards import LAYOUT_KEY, TASK_DIRS, packed_schema
from datacontract.tokenizer import load_tokenizer, resolve_token_spec

from .build_config import BuildConfig
from .documents import Document, DocumentBuilder
from .sources import Chunk, Reject, read_chunk

WORK_DIR = ".work"
_BATCH_ROWS = 16  # rows per Arrow record batch (bounds the memory of a writer)


def atomic_write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    try:
        text = json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (a file name that is not UTF-8): escape it
        text = json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=True).encode("ascii")
    with open(tmp, "wb") as f:
        f.write(text + b"\n")
    os.replace(tmp, path)


def clean_text(text: str) -> str:
    """A string that UTF-8 and Arrow accept: lone surrogates become backslash escapes, and memory
    addresses in error messages are dropped (rejects.jsonl must not change between runs)."""
    import re

    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)


def _lone_surrogate(record) -> Optional[str]:
    """Where a record's text holds a lone surrogate (valid JSON "\\ud800", not valid Unicode)."""
    fields = [("caption", record.caption), ("text", record.text)]
    for i, (q, a) in enumerate(record.turns or []):
        fields += [(f"question {i}", q), (f"answer {i}", a)]
    for name, value in fields:
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                return f"{name}: lone surrogate U+{ord(value[e.start]):04X} at character {e.start}"
    return None


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _list_array(arrays: List[np.ndarray], value_type: pa.DataType) -> pa.Array:
    """list<value_type> from numpy arrays, without a python-object round trip."""
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, value_type))


def _maybe_kill(counter: List[int], limit: Optional[int]) -> None:
    """Test hook: die hard (no cleanup, like a SIGKILL from outside) after ``limit`` units."""
    if limit is None:
        return
    counter[0] += 1
    if counter[0] > limit:
        os.kill(os.getpid(), signal.SIGKILL)



# ------------------------------------------------------------------------------------ worker state

_STATE: dict = {}


def init_worker(cfg: BuildConfig, queue) -> None:
    """Per-process state; ``queue.put(n)`` receives progress (None: the inline progress bar)."""
    _STATE.clear()
    _STATE["cfg"] = cfg
    _STATE["queue"] = queue
    _STATE["kills"] = [0]


def _maybe_kill_worker(kind: str, index: int) -> None:
    """Test hook: a worker SIGKILLs itself on one unit (once, or on every attempt)."""
    spec = _STATE["cfg"].debug_kill_worker
    if not spec or _STATE.get("queue") is None:
        return
    parts = spec.split(":")
    if parts[0] != kind or int(parts[1]) != index:
        return
    flag = os.path.join(_STATE["cfg"].out, WORK_DIR, f"debug-killed-{kind}-{index}")
    if parts[-1] != "always":
        if os.path.exists(flag):
            return
        open(flag, "w").close()
    os.kill(os.getpid(), signal.SIGKILL)


def use_inline_progress(progress) -> None:
    """Units run in this process (one worker): their progress goes straight to ``progress``."""
    _STATE["progress"] = progress
    _STATE["queue"] = None


def _report(n: int) -> None:
    q = _STATE.get("queue")
    if q is not None:
        q.put(n)
    elif _STATE.get("progress") is not None:
        _STATE["progress"].update(n)


def document_builder() -> DocumentBuilder:
    if "builder" not in _STATE:
        cfg = _STATE["cfg"]
        tok = load_tokenizer(cfg.tokenizer)
        spec = resolve_token_spec(tok, cfg.begin_of_image, cfg.end_of_image, cfg.image_placeholder, cfg.pad_token)
        _STATE["builder"] = DocumentBuilder(tok, spec, cfg.layout)
    return _STATE["builder"]


def _codes():
    cfg = _STATE["cfg"]
    if cfg.codec is None:
        return None
    if "codes" not in _STATE:
        from .codes import CodeEncoder

        # Several CPU workers share the cores: one thread each. Inline (1 worker): torch's default.
        threads = 1 if cfg.workers > 1 and _STATE.get("queue") is not None else 0
        _STATE["codes"] = CodeEncoder(cfg.codec, cfg.codec_path, cfg.codec_device, cfg.codec_batch_size, threads)
    return _STATE["codes"]


def _vae():
    cfg = _STATE["cfg"]
    if cfg.vae is None:
        return None
    if "vae" not in _STATE:
        from .latents import VaeEncoder

        _STATE["vae"] = VaeEncoder(cfg.vae, cfg.vae_device, cfg.vae_compute_dtype, cfg.latent_dtype,
                                   cfg.vae_batch_size)
    return _STATE["vae"]


# ------------------------------------------------------------------------------------ phase 1


def docs_schema() -> pa.Schema:
    return pa.schema([
        pa.field("task", pa.uint8()),
        pa.field("length", pa.int32()),
        pa.field("source", pa.string()),
        pa.field("key", pa.string()),
        pa.field("truncated", pa.bool_()),
        pa.field(COL_INPUT_IDS, pa.list_(pa.int32())),
        pa.field(COL_TOKEN_KIND, pa.list_(pa.uint8())),
        pa.field(COL_TARGET_MASK, pa.list_(pa.uint8())),
        pa.field(COL_UND_IMAGES, pa.list_(pa.binary())),
        pa.field(COL_GEN_IMAGES, pa.list_(pa.binary())),
        pa.field(COL_GEN_LATENTS, pa.list_(pa.binary())),
    ])


def chunk_paths(work: str, index: int) -> Tuple[str, str, str]:
    base = os.path.join(work, "docs", f"chunk-{index:06d}")
    return base + ".arrow", base + ".rejects.jsonl", base + ".json"


def _write_docs(writer, docs: List[Document]) -> None:
    codes = _codes()
    if codes is not None:
        gen = [d for d in docs if d.gen_pixels]
        if gen:
            for d, c in zip(gen, codes.encode([d.gen_pixels[0] for d in gen])):
                slots = d.token_kind == TokenKind.GEN_CODE
                if int(slots.sum()) != len(c):
                    raise ValueError(f"{d.key}: the codec gave {len(c)} codes for {int(slots.sum())} code slots")
                d.input_ids[slots] = c
    vae = _vae()
    if vae is not None:
        gen = [(d, i) for d in docs for i in range(len(d.gen_pixels))]
        if gen:
            latents = vae.encode([d.gen_pixels[i] for d, i in gen])
            for (d, _), z in zip(gen, latents):
                d.gen_latents.append(z)
    batch = pa.record_batch(
        [
            pa.array([int(d.task) for d in docs], pa.uint8()),
            pa.array([len(d) for d in docs], pa.int32()),
            pa.array([d.source for d in docs], pa.string()),
            pa.array([d.key for d in docs], pa.string()),
            pa.array([d.truncated for d in docs], pa.bool_()),
            _list_array([d.input_ids for d in docs], pa.int32()),
            _list_array([d.token_kind for d in docs], pa.uint8()),
            _list_array([d.target_mask for d in docs], pa.uint8()),
            pa.array([d.und_images for d in docs], pa.list_(pa.binary())),
            pa.array([d.gen_images for d in docs], pa.list_(pa.binary())),
            pa.array([d.gen_latents for d in docs], pa.list_(pa.binary())),
        ],
        schema=docs_schema(),
    )
    writer.write_batch(batch)


def run_chunk(chunk: Chunk) -> dict:
    """Phase 1 for one chunk: documents + rejects + done marker. Returns the marker's content."""
    cfg: BuildConfig = _STATE["cfg"]
    work = os.path.join(cfg.out, WORK_DIR)
    docs_path, rejects_path, marker_path = chunk_paths(work, chunk.index)
    builder = document_builder()
    _maybe_kill_worker("chunk", chunk.index)
    stats = Counter()
    reasons = Counter()
    pending: List[Document] = []
    unreported = 0
    with pa.OSFile(docs_path + ".tmp", "wb") as sink, \
            pa.ipc.new_file(sink, docs_schema()) as writer, \
            open(rejects_path + ".tmp", "w", encoding="utf-8") as rejects:

        def reject(r: Reject) -> None:
            stats["rejected"] += 1
            reasons[r.reason] += 1
            line = {k: clean_text(v) for k, v in r.to_json().items()}
            rejects.write(json.dumps(line, ensure_ascii=False, sort_keys=True) + "\n")

        records = read_chunk(chunk, cfg.reader)
        while True:
            try:
                item = next(records)
            except StopIteration:
                break
            except Exception as e:  # a reader bug must not lose the chunk silently
                stats["records_in"] += 1
                reject(Reject(chunk.path, f"<chunk {chunk.index} rest>", "reader_error", f"{type(e).__name__}: {e}"))
                break
            stats["records_in"] += 1
            unreported += 1
            if isinstance(item, Reject):
                reject(item)
            else:
                item.key, item.source = clean_text(item.key), clean_text(item.source)
                bad_unicode = _lone_surrogate(item)
                try:
                    doc = builder.build(item) if bad_unicode is None else \
                        Reject(item.source, item.key, "invalid_unicode", bad_unicode)
                except Exception as e:  # no single record may end a build
                    doc = Reject(item.source, item.key, "internal_error", f"{type(e).__name__}: {e}")
                if isinstance(doc, Reject):
                    reject(doc)
                else:
                    stats["written"] += 1
                    stats["truncated"] += int(doc.truncated)
                    stats["tokens"] += len(doc)
                    pending.append(doc)
                    if len(pending) >= max(_BATCH_ROWS, cfg.vae_batch_size if cfg.vae else 0,
                                           cfg.codec_batch_size if cfg.codec else 0):
                        _write_docs(writer, pending)
                        pending = []
            if unreported >= 32:
                _report(unreported)
                unreported = 0
        if pending:
            _write_docs(writer, pending)
    _report(unreported)
    os.replace(rejects_path + ".tmp", rejects_path)
    os.replace(docs_path + ".tmp", docs_path)
    _maybe_kill(_STATE["kills"], cfg.debug_kill_after)
    marker = {
        "chunk": chunk.index,
        "path": chunk.path,
        "format": chunk.fmt,
        "task": Task(chunk.task).name,
        "records_in": stats["records_in"],
        "records_written": stats["written"],
        "records_rejected": stats["rejected"],
        "records_truncated": stats["truncated"],
        "tokens": stats["tokens"],
        "rejects_by_reason": dict(sorted(reasons.items())),
        "docs_bytes": os.path.getsize(docs_path),
    }
    atomic_write_json(marker_path, marker)
    return marker


# ------------------------------------------------------------------------------------ phase 2


class DocStore:
    """Random access to documents by global reference across the chunk document files."""

    def __init__(self, work: str, chunk_ids: List[int], chunk_starts: List[int]) -> None:
        self.work = work
        self.chunk_ids = chunk_ids
        self.chunk_starts = chunk_starts
        self._tables: Dict[int, pa.Table] = {}

    def _table(self, chunk_pos: int) -> pa.Table:
        if chunk_pos not in self._tables:
            if len(self._tables) >= 64:
                self._tables.pop(next(iter(self._tables)))
            path = chunk_paths(self.work, self.chunk_ids[chunk_pos])[0]
            self._tables[chunk_pos] = pa.ipc.open_file(pa.memory_map(path, "r")).read_all()
        return self._tables[chunk_pos]

    def get(self, ref: int) -> dict:
        pos = bisect.bisect_right(self.chunk_starts, ref) - 1
        table = self._table(pos)
        return table.slice(ref - self.chunk_starts[pos], 1).to_pylist()[0]


def shard_rel(task: Task, index: int) -> str:
    return f"{TASK_DIRS[task]}/shard-{index:05d}.arrow"


def _doc_key(doc: dict) -> str:
    name = doc["source"].replace("\\", "/").rsplit("/", 1)[-1]
    return f"{name}:{doc['key']}"


def run_shard(job: tuple) -> dict:
    """Phase 2 for one shard: (task, index, bins, chunk_ids, chunk_starts, layout json)."""
    task, index, bins, chunk_ids, chunk_starts, layout = job
    cfg: BuildConfig = _STATE["cfg"]
    work = os.path.join(cfg.out, WORK_DIR)
    store = _STATE.get("store")
    if store is None or store.chunk_starts != chunk_starts:
        store = _STATE["store"] = DocStore(work, chunk_ids, chunk_starts)
    with_latents = cfg.vae is not None
    schema = packed_schema(with_latents, {LAYOUT_KEY: layout})
    rel = shard_rel(task, index)
    path = os.path.join(cfg.out, rel)
    _maybe_kill_worker("shard", index)
    tokens = 0
    doc_counts = Counter()
    rows: List[dict] = []

    def flush(writer) -> None:
        cols = [
            _list_array([r["ids"] for r in rows], pa.int32()),
            _list_array([r["kinds"] for r in rows], pa.uint8()),
            _list_array([r["targets"] for r in rows], pa.uint8()),
            pa.array([r["lengths"] for r in rows], pa.list_(pa.int32())),
            pa.array([r["tasks"] for r in rows], pa.list_(pa.uint8())),
            pa.array([r["und"] for r in rows], pa.list_(pa.binary())),
            pa.array([r["gen"] for r in rows], pa.list_(pa.binary())),
        ]
        if with_latents:
            cols.append(pa.array([r["latents"] for r in rows], pa.list_(pa.binary())))
            cols.append(pa.array([cfg.latent_dtype] * len(rows), pa.string()))
        cols.append(pa.array([r["keys"] for r in rows], pa.list_(pa.string())))
        writer.write_batch(pa.record_batch(cols, schema=schema))
        rows.clear()

    last = (None, None)
    with pa.OSFile(path + ".tmp", "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for b in bins:
            row = {k: [] for k in ("ids", "kinds", "targets", "lengths", "tasks", "und", "gen", "latents", "keys")}
            for ref, start, stop in b:
                if last[0] != ref:  # consecutive pieces of one text document share one read
                    last = (ref, store.get(ref))
                doc = last[1]
                full = len(doc[COL_INPUT_IDS])
                targets = np.asarray(doc[COL_TARGET_MASK][start:stop], dtype=np.uint8)
                if start > 0:
                    targets[0] = 0  # a continuation piece: its first token has no context
                row["ids"].append(np.asarray(doc[COL_INPUT_IDS][start:stop], dtype=np.int32))
                row["kinds"].append(np.asarray(doc[COL_TOKEN_KIND][start:stop], dtype=np.uint8))
                row["targets"].append(targets)
                row["lengths"].append(stop - start)
                row["tasks"].append(doc["task"])
                row["und"].extend(doc[COL_UND_IMAGES])
                row["gen"].extend(doc[COL_GEN_IMAGES])
                row["latents"].extend(doc[COL_GEN_LATENTS])
                key = _doc_key(doc)
                row["keys"].append(key if (start, stop) == (0, full) else f"{key}@{start}")
                doc_counts[TASK_DIRS[Task(doc["task"])]] += 1
                tokens += stop - start
            rows.append({
                **row,
                "ids": np.concatenate(row["ids"]),
                "kinds": np.concatenate(row["kinds"]),
                "targets": np.concatenate(row["targets"]),
            })
            _report(1)
            if len(rows) >= _BATCH_ROWS:
                flush(writer)
        if rows:
            flush(writer)
    os.replace(path + ".tmp", path)
    _maybe_kill(_STATE["kills"], cfg.debug_kill_after)
    marker = {
        "path": rel,
        "task": TASK_DIRS[task],
        "rows": len(bins),
        "tokens": tokens,
        "documents": dict(sorted(doc_counts.items())),
        "bytes": os.path.getsize(path),
        "sha256": sha256_file(path),
    }
    atomic_write_json(os.path.join(work, "shards", f"{TASK_DIRS[task]}-{index:05d}.json"), marker)
    return marker
