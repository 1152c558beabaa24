"""``python -m data_tools verify``: checksums, manifest accounting and the invariants of every packed
sequence of a finished build. Every problem is one line of the list it returns; the checks go on past
each one (``stats`` and ``inspect``, in ``views``, refuse a damaged build instead)."""

from __future__ import annotations

import os
from typing import List, Optional

import numpy as np

from datacontract.format import (
    COL_DOC_LENGTHS,
    COL_DOC_TASKS,
    COL_GEN_IMAGES,
    COL_GEN_LATENTS,
    COL_INPUT_IDS,
    COL_TARGET_MASK,
    COL_TOKEN_KIND,
    COL_UND_IMAGES,
    PACKED_COLUMNS,
    Task,
    TokenKind,
)
from datacontract.shards import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    REJECTS_NAME,
    TASK_BY_NAME,
    ShardError,
    ShardLayout,
    ShardReader,
    decode_image,
)

from .build_units import sha256_file
from .views import LookError, _layout, _read_manifest_json, _runs, _whole

def check_row(row: dict, layout: ShardLayout, primary: Task, decode: bool = True) -> List[str]:
    """The invariants of one packed sequence; returns the problems found (empty when fine)."""
    p: List[str] = []
    ids, kinds, targets = (np.asarray(row[c]) for c in (COL_INPUT_IDS, COL_TOKEN_KIND, COL_TARGET_MASK))
    lengths, tasks = row[COL_DOC_LENGTHS], row[COL_DOC_TASKS]
    if not (len(ids) == len(kinds) == len(targets) == sum(lengths)):
        return [f"lengths disagree: ids {len(ids)}, kinds {len(kinds)}, targets {len(targets)}, docs {sum(lengths)}"]
    if len(ids) > layout.seq_length:
        p.append(f"{len(ids)} tokens > seq_length {layout.seq_length}")
    if len(lengths) != len(tasks) or not lengths or min(lengths) <= 0:
        p.append("document lengths/tasks malformed")
        return p
    if tasks[0] != primary:
        p.append(f"first document is {Task(tasks[0]).name}, shard task is {primary.name}")
    n_und = n_gen = 0
    start = 0
    for d, (length, task) in enumerate(zip(lengths, tasks)):
        k, t = kinds[start : start + length], targets[start : start + length]
        if t[0]:
            p.append(f"doc {d}: first token is a target")
        if t[(k != TokenKind.TEXT) & (k != TokenKind.GEN_CODE)].any():
            p.append(f"doc {d}: a non-text position is a target")
        if layout.family != "januspro" and (k == TokenKind.GEN_CODE).any():
            p.append(f"doc {d}: Janus-Pro image codes in a {layout.family} shard")
        runs = _runs(k)
        if task == Task.TEXT:
            if (k != TokenKind.TEXT).any():
                p.append(f"doc {d}: text document with image positions")
        elif layout.family == "januspro" and task != Task.TEXT:
            n_und += _januspro_doc_problems(p, d, task, runs, k, t, ids[start:start + length], layout)
            n_gen += int(task == Task.GENERATION)
        elif task == Task.UNDERSTANDING:
            if ((k == TokenKind.GEN_TIME) | (k == TokenKind.GEN_LATENT) | (k == TokenKind.GEN_CODE)).any():
                p.append(f"doc {d}: understanding document with generation positions")
            for i, (kind, a, b) in enumerate(runs):
                if kind == TokenKind.UND_IMAGE_BEGIN:
                    ok = b - a == 1 and i + 1 < len(runs) and runs[i + 1][0] == TokenKind.UND_IMAGE \
                        and runs[i + 1][2] - runs[i + 1][1] == layout.und_tokens_per_image
                    if not ok:
                        p.append(f"doc {d}: image at {a} is not begin + {layout.und_tokens_per_image} positions")
                    n_und += 1
            if not t.any():
                p.append(f"doc {d}: understanding document without targets")
        elif task == Task.GENERATION:
            if t.any():
                p.append(f"doc {d}: generation document with token targets")
            times = [r for r in runs if r[0] == TokenKind.GEN_TIME]
            if len(times) != 1:
                p.append(f"doc {d}: {len(times)} time tokens")
            for i, (kind, a, b) in enumerate(runs):
                if kind == TokenKind.GEN_TIME:
                    ok = b - a == 1 and i + 1 < len(runs) and runs[i + 1][0] == TokenKind.GEN_LATENT \
                        and runs[i + 1][2] - runs[i + 1][1] == layout.gen_tokens_per_image
                    if not ok:
                        p.append(f"doc {d}: time token at {a} not followed by {layout.gen_tokens_per_image} latents")
                    n_gen += 1
        start += length
    if len(row[COL_UND_IMAGES]) != n_und:
        p.append(f"{len(row[COL_UND_IMAGES])} understanding images for {n_und} image slots")
    if len(row[COL_GEN_IMAGES]) != n_gen:
        p.append(f"{len(row[COL_GEN_IMAGES])} generation images for {n_gen} image slots")
    if layout.latent_shape is not None:
        latents = row.get(COL_GEN_LATENTS) or []
        if len(latents) != n_gen:
            p.append(f"{len(latents)} latents for {n_gen} image slots")
        size = int(np.prod(layout.latent_shape)) * 2
        if any(len(z) != size for z in latents):
            p.append(f"a latent is not {size} bytes")
    if decode:
        for col in (COL_UND_IMAGES, COL_GEN_IMAGES):
            for i, data in enumerate(row[col]):
                try:
                    shape = decode_image(data).shape
                except Exception as e:
                    p.append(f"{col}[{i}] does not decode: {e}")
                    continue
                if shape != (layout.resolution, layout.resolution, 3):
                    p.append(f"{col}[{i}] has shape {shape}")
    return p


def _januspro_doc_problems(p: List[str], d: int, task: Task, runs, kinds, targets, ids, layout: ShardLayout) -> int:
    """Janus-Pro's layouts (``format.py``): plain-token image begins, one run of codes per generation
    document, targets exactly on the codes, codes inside the codebook. Returns the understanding images."""
    if ((kinds == TokenKind.UND_IMAGE_BEGIN) | (kinds == TokenKind.GEN_TIME) | (kinds == TokenKind.GEN_LATENT)).any():
        p.append(f"doc {d}: JanusFlow slots (learned image begin, time or latent) in a Janus-Pro document")
    images = [(a, b) for kind, a, b in runs if kind == TokenKind.UND_IMAGE]
    codes = [(a, b) for kind, a, b in runs if kind == TokenKind.GEN_CODE]
    if any(b - a != layout.und_tokens_per_image for a, b in images):
        p.append(f"doc {d}: an understanding image is not {layout.und_tokens_per_image} positions")
    if task == Task.UNDERSTANDING:
        if codes:
            p.append(f"doc {d}: understanding document with image codes")
        if not targets.any():
            p.append(f"doc {d}: understanding document without targets")
        return len(images)
    if images:
        p.append(f"doc {d}: generation document with understanding image slots")
    if len(codes) != 1 or codes[0][1] - codes[0][0] != layout.gen_tokens_per_image:
        p.append(f"doc {d}: not one run of {layout.gen_tokens_per_image} image codes")
    is_code = kinds == TokenKind.GEN_CODE
    if not np.array_equal(targets.astype(bool), is_code):
        p.append(f"doc {d}: generation targets are not exactly the image codes")
    size = int((layout.image_codec or {}).get("codebook_size", 0))
    if size and is_code.any() and (ids[is_code].min() < 0 or ids[is_code].max() >= size):
        p.append(f"doc {d}: image codes outside the codebook 0..{size - 1}")
    return 0


def verify(root: str, decode: bool = True) -> List[str]:
    """Checksums, manifest accounting and every sequence's invariants; returns every problem found.

    ``LookError`` only when nothing can be checked: ``root`` is no build, or its manifest.json is not
    a JSON object. Anything else wrong is one line of the list, and the checks go on."""
    manifest = _read_manifest_json(root)
    where = MANIFEST_NAME
    if not isinstance(manifest, dict):
        raise LookError(f"{os.path.join(root, MANIFEST_NAME)}: not a manifest (a JSON {type(manifest).__name__}); "
                        "rebuild the shards")
    problems: List[str] = []
    if manifest.get("format") != MANIFEST_FORMAT:
        problems.append(f"{where}: format {manifest.get('format')!r}, not {MANIFEST_FORMAT!r} (the trainer refuses it)")
    try:
        layout: Optional[ShardLayout] = _layout(root, manifest)
    except LookError as e:
        problems.append(str(e).replace(os.path.join(root, MANIFEST_NAME), where, 1))
        layout = None
    inputs = manifest.get("inputs")
    if not isinstance(inputs, list):
        problems.append(f"{where}: inputs is {type(inputs).__name__}, not a list")
        inputs = []
    for i, e in enumerate(inputs):
        counts = [e.get(k) for k in ("records_in", "records_written", "records_rejected")] if isinstance(e, dict) else []
        if len(counts) != 3 or not all(_whole(c) for c in counts):
            problems.append(f"{where}: inputs[{i}] has no whole-number records_in/written/rejected")
        elif counts[0] != counts[1] + counts[2]:
            problems.append(f"{e.get('path')}: records in {counts[0]} != written + rejected")
    totals = manifest.get("totals") if isinstance(manifest.get("totals"), dict) else {}
    problems += _rejects_problems(root, totals.get("records_rejected"))
    tasks = manifest.get("tasks")
    if not isinstance(tasks, dict):
        problems.append(f"{where}: tasks is {type(tasks).__name__}, not a map of und, gen, text to their shards")
        tasks = {}
    seen: dict = {}
    sequences = tokens = 0
    for name, entry in tasks.items():
        primary = TASK_BY_NAME.get(name)
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if primary is None:
            problems.append(f"{where}: tasks.{name}: not a task (und, gen, text); the trainer refuses the manifest")
            continue
        if not isinstance(shards, list):
            problems.append(f"{where}: tasks.{name}.shards is {type(shards).__name__}, not a list")
            continue
        rows_seen, tokens_seen, all_read = 0, 0, True
        for i, shard in enumerate(shards):
            key = f"tasks.{name}.shards[{i}]"
            bad = _shard_entry_problems(root, key, shard, seen)
            problems += [f"{where}: {x}" for x in bad]
            if bad:
                all_read = False
                continue
            found, counts = _shard_problems(root, shard, layout, primary, decode)
            problems += found
            if counts is None:
                all_read = False
            else:
                rows_seen, tokens_seen = rows_seen + counts[0], tokens_seen + counts[1]
        for field, value in (("sequences", rows_seen), ("tokens", tokens_seen)):
            if all_read and entry.get(field) != value:
                problems.append(f"{where}: tasks.{name}.{field} is {entry.get(field)!r}, its shards hold {value}")
        sequences += entry.get("sequences") if _whole(entry.get("sequences")) else 0
        tokens += entry.get("tokens") if _whole(entry.get("tokens")) else 0
    for field, value in (("sequences", sequences), ("tokens", tokens)):
        if totals.get(field) != value:
            problems.append(f"{where}: totals.{field} is {totals.get(field)!r}, the tasks sum to {value}")
    return problems


def _rejects_problems(root: str, expected) -> List[str]:
    try:
        with open(os.path.join(root, REJECTS_NAME), encoding="utf-8") as f:
            n_rejects = sum(1 for line in f if line.strip())
    except OSError as e:
        return [f"{REJECTS_NAME}: {(e.strerror or str(e)).lower()}"]
    except UnicodeDecodeError:
        return [f"{REJECTS_NAME}: not UTF-8 text (damaged)"]
    if n_rejects != expected:
        return [f"{REJECTS_NAME} has {n_rejects} lines, manifest says {expected!r}"]
    return []


def _shard_entry_problems(root: str, key: str, shard, seen: dict) -> List[str]:
    """What is wrong with one ``tasks.T.shards[i]`` entry (``check_manifest``'s rules, all of them)."""
    if not isinstance(shard, dict):
        return [f"{key} is {type(shard).__name__}, not an entry"]
    p = []
    path = shard.get("path")
    if not isinstance(path, str) or not path or "\0" in path:
        p.append(f"{key}.path must be a file name, got {path!r}")
    else:
        real_root = os.path.realpath(root)
        full = os.path.realpath(os.path.join(root, path))
        if os.path.isabs(path) or os.path.commonpath([real_root, full]) != real_root:
            p.append(f"{key}.path {path!r} is outside the build (the trainer refuses it)")
        elif full in seen:
            p.append(f"{key} lists {path!r} again (also {seen[full]})")
        else:
            seen[full] = key
    p += [f"{key}.{f} must be a whole number >= 0, got {shard.get(f)!r}" for f in ("rows", "bytes", "tokens")
          if not _whole(shard.get(f))]
    if not isinstance(shard.get("sha256"), str):
        p.append(f"{key}.sha256 must be a hex string, got {shard.get('sha256')!r}")
    return p


def _shard_problems(root: str, shard: dict, layout: Optional[ShardLayout], primary: Task, decode: bool):
    """(problems of one shard file, (rows, tokens) it holds or None when it cannot be read)."""
    name = shard["path"]
    path = os.path.join(root, name)
    if not os.path.exists(path):
        return [f"{name}: missing"], None
    if not os.path.isfile(path):
        return [f"{name}: not a file"], None
    p = []
    try:
        if sha256_file(path) != shard["sha256"]:
            p.append(f"{name}: checksum mismatch ({os.path.getsize(path)} bytes, manifest says {shard['bytes']})")
        reader = ShardReader(path)
        rows = reader.table.to_pylist()
    except Exception as e:  # ShardError, or what damaged schema metadata raises (UnicodeDecodeError, ...)
        return p + [f"{name}: unreadable: {e if isinstance(e, ShardError) else f'{type(e).__name__}: {e}'}"], None
    missing = [c for c in PACKED_COLUMNS if c not in reader.table.column_names]
    if missing:
        return p + [f"{name}: missing columns {missing}"], None
    if layout is not None and reader.layout is not None and reader.layout != layout:
        return p + [f"{name}: written for another layout than the manifest's (a shard of another build?)"], None
    if reader.num_rows != shard["rows"]:
        p.append(f"{name}: {reader.num_rows} rows, manifest says {shard['rows']}")
    for i, row in enumerate(rows):
        try:
            found = check_row(row, layout, primary, decode) if layout is not None else []
        except Exception as e:  # a row bad enough to break a check: say so, go on with the next
            found = [f"cannot be checked ({type(e).__name__}: {e})"]
        p.extend(f"{name} row {i}: {x}" for x in found)
    return p, (reader.num_rows, sum(len(r[COL_INPUT_IDS]) for r in rows))
