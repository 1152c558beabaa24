"""Looking at a finished build: ``stats``, ``inspect`` and ``verify``."""

from __future__ import annotations

import os
from typing import List, Optional

import numpy as np

from datacontract.format import (
    COL_DOC_LENGTHS,
    COL_DOC_TASKS,
    COL_GEN_IMAGES,
    COL_GEN_LATENT_DTYPE,
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
    COL_DOC_KEYS,
    REJECTS_NAME,
    TASK_BY_NAME,
    TASK_DIRS,
    ShardLayout,
    ShardReader,
    decode_image,
    decode_latent,
    read_manifest,
)

from .build_units import sha256_file


def _histogram(values: List[int], bins: int, top: int) -> List[dict]:
    if not values:
        return []
    counts, edges = np.histogram(values, bins=bins, range=(0, max(top, max(values))))
    return [{"from": int(edges[i]), "to": int(edges[i + 1]), "count": int(c)} for i, c in enumerate(counts)]


def stats(root: str, bins: int = 16) -> dict:
    """Counts, fill and document/sequence length histograms, per task."""
    manifest = read_manifest(root)
    seq_length = manifest["layout"]["seq_length"]
    report = {"totals": manifest["totals"], "rejects_by_reason": manifest["rejects"]["by_reason"], "tasks": {}}
    for name, entry in manifest["tasks"].items():
        doc_lengths = {t.name.lower(): [] for t in Task}
        seq_lengths = []
        for shard in entry["shards"]:
            reader = ShardReader(os.path.join(root, shard["path"]))
            cols = reader.table.select([COL_DOC_LENGTHS, COL_DOC_TASKS]).to_pydict()
            for lengths, tasks in zip(cols[COL_DOC_LENGTHS], cols[COL_DOC_TASKS]):
                seq_lengths.append(sum(lengths))
                for n, t in zip(lengths, tasks):
                    doc_lengths[Task(t).name.lower()].append(n)
        report["tasks"][name] = {
            "sequences": entry["sequences"],
            "tokens": entry["tokens"],
            "fill": entry["fill"],
            "documents": {k: len(v) for k, v in doc_lengths.items() if v},
            "mean_document_length": {k: float(np.mean(v)) for k, v in doc_lengths.items() if v},
            "sequence_length_histogram": _histogram(seq_lengths, bins, seq_length),
            "document_length_histogram": {
                k: _histogram(v, bins, seq_length) for k, v in doc_lengths.items() if v
            },
        }
    return report


def format_stats(report: dict) -> str:
    t = report["totals"]
    lines = [
        f"records in {t['records_in']} = written {t['records_written']} + rejected {t['records_rejected']}"
        f" ({t['records_truncated']} truncated)",
        f"sequences {t['sequences']}, tokens {t['tokens']}, fill {t['fill']:.4f}, "
        f"text filler tokens {t['filler_tokens']}",
    ]
    if report["rejects_by_reason"]:
        lines.append("rejects: " + ", ".join(f"{k} {v}" for k, v in report["rejects_by_reason"].items()))
    for name, e in report["tasks"].items():
        lines.append(f"[{name}] sequences {e['sequences']}, tokens {e['tokens']}, fill {e['fill']:.4f}, "
                     f"documents {e['documents']}")
        hist = e["document_length_histogram"]
        for kind, buckets in hist.items():
            peak = max(b["count"] for b in buckets) or 1
            lines.append(f"  {kind} document lengths:")
            for b in buckets:
                if b["count"]:
                    bar = "#" * max(1, round(40 * b["count"] / peak))
                    lines.append(f"    {b['from']:>6}-{b['to']:<6} {b['count']:>8} {bar}")
    return "\n".join(lines)


def _runs(kinds: np.ndarray):
    """(kind, start, stop) runs of equal token kinds."""
    if len(kinds) == 0:
        return []
    cuts = np.flatnonzero(np.diff(kinds)) + 1
    starts = np.concatenate([[0], cuts])
    stops = np.concatenate([cuts, [len(kinds)]])
    return [(int(kinds[a]), int(a), int(b)) for a, b in zip(starts, stops)]


def inspect(root: str, task: str, index: int, out: str, tokenizer_path: Optional[str] = None) -> List[str]:
    """Write ``sequence.txt`` (documents as text, targets shown) and each image as a PNG file."""
    from PIL import Image

    from datacontract.tokenizer import load_tokenizer

    manifest = read_manifest(root)
    tok = load_tokenizer(tokenizer_path or manifest["config"]["tokenizer"])
    layout = ShardLayout.from_json(manifest["layout"])
    row = _find_row(root, manifest, task, index)
    os.makedirs(out, exist_ok=True)
    ids = np.asarray(row[COL_INPUT_IDS])
    kinds = np.asarray(row[COL_TOKEN_KIND])
    targets = np.asarray(row[COL_TARGET_MASK])
    written, lines = [], [f"{task} sequence {index}: {len(ids)} tokens, {len(row[COL_DOC_LENGTHS])} documents"]
    und_i = gen_i = 0
    start = 0
    keys = row.get(COL_DOC_KEYS) or [""] * len(row[COL_DOC_LENGTHS])
    for d, (length, dtask, key) in enumerate(zip(row[COL_DOC_LENGTHS], row[COL_DOC_TASKS], keys)):
        sl = slice(start, start + length)
        lines.append(f"\n=== document {d}: {Task(dtask).name.lower()}, {length} tokens, {key} ===")
        text = []
        for kind, a, b in _runs(kinds[sl]):
            a, b = a + start, b + start
            if kind == TokenKind.TEXT:
                text.append(tok.decode(ids[a:b].tolist()))
            elif kind == TokenKind.UND_IMAGE_BEGIN:
                text.append(f"[und image {und_i}: ")
            elif kind == TokenKind.UND_IMAGE:
                head = f"[und image {und_i}: " if layout.family == "januspro" else ""  # its begin is plain text
                text.append(f"{head}{b - a} image positions, und-{und_i:02d}.png]")
                und_i += 1
            elif kind == TokenKind.GEN_TIME:
                text.append(f"[gen image {gen_i}: time token, ")
            elif kind == TokenKind.GEN_LATENT:
                text.append(f"{b - a} latent positions, gen-{gen_i:02d}.png]")
                gen_i += 1
            elif kind == TokenKind.GEN_CODE:
                path = os.path.join(out, f"gen-{gen_i:02d}-codes.npy")
                np.save(path, ids[a:b].reshape(layout.code_grid or (-1,)))
                written.append(path)
                text.append(f"[gen image {gen_i}: {b - a} codes, gen-{gen_i:02d}.png, gen-{gen_i:02d}-codes.npy]")
                gen_i += 1
        lines.append("".join(text))
        is_target = targets[sl].astype(bool)
        n_codes = int((is_target & (kinds[sl] == TokenKind.GEN_CODE)).sum())
        tgt = ids[sl][is_target & (kinds[sl] != TokenKind.GEN_CODE)]
        codes = f" + {n_codes} image codes" if n_codes else ""
        lines.append(f"--- targets ({len(tgt)} tokens{codes}): {tok.decode(tgt.tolist())!r}")
        start += length
    for prefix, col in (("und", COL_UND_IMAGES), ("gen", COL_GEN_IMAGES)):
        for i, data in enumerate(row[col]):
            path = os.path.join(out, f"{prefix}-{i:02d}.png")
            Image.fromarray(decode_image(data)).save(path)
            written.append(path)
    for i, data in enumerate(row.get(COL_GEN_LATENTS) or []):
        path = os.path.join(out, f"gen-{i:02d}-latent.npy")
        np.save(path, decode_latent(data, row[COL_GEN_LATENT_DTYPE], layout.latent_shape))
        written.append(path)
    text_path = os.path.join(out, "sequence.txt")
    with open(text_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return [text_path] + written


def _find_row(root: str, manifest: dict, task: str, index: int) -> dict:
    remaining = index
    for shard in manifest["tasks"][task]["shards"]:
        if remaining < shard["rows"]:
            return ShardReader(os.path.join(root, shard["path"])).read_row(remaining)
        remaining -= shard["rows"]
    raise IndexError(f"{task} has {manifest['tasks'][task]['sequences']} sequences; no index {index}")


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
    """Checksums, manifest accounting and every sequence's invariants; returns the problems."""
    manifest = read_manifest(root)
    layout = ShardLayout.from_json(manifest["layout"])
    problems: List[str] = []
    for e in manifest["inputs"]:
        if e["records_in"] != e["records_written"] + e["records_rejected"]:
            problems.append(f"{e['path']}: records in {e['records_in']} != written + rejected")
    with open(os.path.join(root, REJECTS_NAME), encoding="utf-8") as f:
        n_rejects = sum(1 for line in f if line.strip())
    if n_rejects != manifest["totals"]["records_rejected"]:
        problems.append(f"{REJECTS_NAME} has {n_rejects} lines, manifest says {manifest['totals']['records_rejected']}")
    for name, entry in manifest["tasks"].items():
        primary = TASK_BY_NAME[name]
        for shard in entry["shards"]:
            path = os.path.join(root, shard["path"])
            if not os.path.exists(path):
                problems.append(f"{shard['path']}: missing")
                continue
            if sha256_file(path) != shard["sha256"]:
                problems.append(f"{shard['path']}: checksum mismatch")
            try:
                reader = ShardReader(path)
                rows = reader.table.to_pylist()
            except Exception as e:
                problems.append(f"{shard['path']}: unreadable: {type(e).__name__}: {e}")
                continue
            missing = [c for c in PACKED_COLUMNS if c not in reader.table.column_names]
            if missing:
                problems.append(f"{shard['path']}: missing columns {missing}")
                continue
            if reader.num_rows != shard["rows"]:
                problems.append(f"{shard['path']}: {reader.num_rows} rows, manifest says {shard['rows']}")
            for i, row in enumerate(rows):
                problems.extend(f"{shard['path']} row {i}: {x}" for x in check_row(row, layout, primary, decode))
    return problems


__all__ = ["stats", "format_stats", "inspect", "verify", "check_row", "TASK_DIRS"]
