"""Looking at a finished build: ``stats``, ``inspect`` and ``verify``."""

from __future__ import annotations

import json
import os
import re
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
    Task,
    TokenKind,
)
from datacontract.shards import (
    COL_DOC_KEYS,
    MANIFEST_NAME,
    TASK_BY_NAME,
    ShardError,
    ShardLayout,
    ShardReader,
    check_manifest,
    check_shard_files,
    decode_image,
    decode_latent,
)

from .build_units import WORK_DIR
from .state import file_changes, tokenizer_fingerprint

# The only files ``inspect`` deletes in its --out: those an earlier inspect wrote (a shorter sequence
# would otherwise leave the images of a longer one beside its own, as if they were part of it).
INSPECT_FILES = re.compile(r"^(sequence\.txt|(und|gen)-\d{2,}(\.png|-codes\.npy|-latent\.npy))$")


class LookError(ValueError):
    """A root, manifest, shard or option that stats/inspect/verify cannot work with: one line that
    names the file or option and what to do (the CLI prints it as ``error: ...``, exit status 2)."""


def _verify_hint(root: str) -> str:
    return f"`python -m data_tools verify {root}` lists every problem"


def _read_manifest_json(root: str):
    """The parsed manifest.json of ``root`` (any JSON value), or ``LookError`` saying what ``root`` is."""
    if not os.path.exists(root):
        raise LookError(f"{root}: no such folder; give the --out folder of a `python -m data_tools build`")
    if not os.path.isdir(root):
        raise LookError(f"{root}: a file, not a build folder; give the --out folder of a `python -m data_tools build`")
    path = os.path.join(root, MANIFEST_NAME)
    if not os.path.lexists(path):
        if os.path.isdir(os.path.join(root, WORK_DIR)):  # what a running or interrupted build leaves
            raise LookError(f"{path} not found: the build in {root} is still running or was interrupted (its "
                            f"{WORK_DIR} folder is there); wait for it to finish, or re-run the same build command "
                            "to resume it")
        raise LookError(f"{path} not found: {root} is not the output root of a build; give the --out folder of a "
                        "finished `python -m data_tools build`")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise LookError(f"{path}: {(e.strerror or str(e)).lower()}; the manifest must be a readable file: "
                        "rebuild the shards") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise LookError(f"{path}: not JSON ({str(e).splitlines()[0]}); the manifest is damaged: rebuild the "
                        "shards") from None


def load_manifest(root: str) -> dict:
    """The manifest of a finished build, checked as the trainer checks it (``check_manifest``)."""
    manifest = _read_manifest_json(root)
    check_manifest(root, manifest)
    return manifest


def _layout(root: str, manifest: dict) -> ShardLayout:
    try:
        return ShardLayout.from_json(manifest["layout"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        what = f"no {e}" if isinstance(e, KeyError) else str(e)
        raise LookError(f"{os.path.join(root, MANIFEST_NAME)}: layout unreadable ({what}); rebuild the shards") from None


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def _open_shard(root: str, shard: dict, layout: ShardLayout) -> ShardReader:
    """A shard whose rows and layout are the manifest's (a damaged or swapped one: ``LookError``)."""
    try:
        return ShardReader(os.path.join(root, shard["path"]), rows=shard["rows"], layout=layout)
    except ShardError as e:
        raise LookError(f"{e} ({_verify_hint(root)})") from None


def _histogram(values: List[int], bins: int, top: int) -> List[dict]:
    if not values:
        return []
    counts, edges = np.histogram(values, bins=bins, range=(0, max(top, max(values))))
    return [{"from": int(edges[i]), "to": int(edges[i + 1]), "count": int(c)} for i, c in enumerate(counts)]


_TOTALS = ("records_in", "records_written", "records_rejected", "records_truncated", "sequences", "tokens",
           "filler_tokens")


def _stats_fields(root: str, manifest: dict) -> None:
    """The manifest numbers ``format_stats`` prints: present and numbers, else ``LookError`` naming the key."""
    where = os.path.join(root, MANIFEST_NAME)
    bad = []
    totals = manifest.get("totals")
    if not isinstance(totals, dict):
        bad.append(f"totals is {type(totals).__name__}")
    else:
        bad += [f"totals.{k} is {totals.get(k)!r}" for k in _TOTALS if not _whole(totals.get(k))]
        if not _number(totals.get("fill")):
            bad.append(f"totals.fill is {totals.get('fill')!r}")
    rejects = manifest.get("rejects")
    by_reason = rejects.get("by_reason") if isinstance(rejects, dict) else None
    if not isinstance(by_reason, dict) or not all(_whole(v) for v in by_reason.values()):
        bad.append(f"rejects.by_reason is {by_reason!r}")
    for name, entry in manifest["tasks"].items():
        bad += [f"tasks.{name}.{k} is {entry.get(k)!r}" for k in ("sequences", "tokens") if not _whole(entry.get(k))]
        if not _number(entry.get("fill")):
            bad.append(f"tasks.{name}.fill is {entry.get('fill')!r}")
    if bad:
        raise LookError(f"{where}: {'; '.join(bad[:3])}{'; ...' if len(bad) > 3 else ''} (counts must be whole "
                        f"numbers >= 0): the manifest is damaged; {_verify_hint(root)}")


def stats(root: str, bins: int = 16) -> dict:
    """Counts, fill and document/sequence length histograms, per task.

    A build with a damaged, missing or swapped shard is refused (``LookError`` naming the file and
    pointing to ``verify``) rather than reported in part: histograms without that shard's sequences
    beside the manifest's totals, which count them, would be numbers that describe no data at all,
    and such a build must be rebuilt before anyone trains on it. The checks are the trainer's: file
    sizes, row counts and layout (no checksums: ``verify`` reads every byte, stats stays quick).
    """
    if bins < 1:
        raise LookError(f"--bins {bins}: must be at least 1")
    manifest = load_manifest(root)
    layout = _layout(root, manifest)
    _stats_fields(root, manifest)
    try:
        check_shard_files(root, manifest, [TASK_BY_NAME[name] for name in manifest["tasks"]])
    except ShardError as e:
        raise LookError(str(e)) from None
    seq_length = layout.seq_length
    report = {"totals": manifest["totals"], "rejects_by_reason": manifest["rejects"]["by_reason"], "tasks": {}}
    for name, entry in manifest["tasks"].items():
        doc_lengths = {t.name.lower(): [] for t in Task}
        seq_lengths = []
        for shard in entry["shards"]:
            reader = _open_shard(root, shard, layout)
            cols = reader.table.select([COL_DOC_LENGTHS, COL_DOC_TASKS]).to_pydict()
            for lengths, tasks in zip(cols[COL_DOC_LENGTHS], cols[COL_DOC_TASKS]):
                seq_lengths.append(sum(lengths))
                for n, t in zip(lengths, tasks):
                    if _task_name(t) not in doc_lengths:
                        raise LookError(f"{reader.path}: a document of {_task_name(t)} (damaged?); "
                                        f"{_verify_hint(root)}")
                    doc_lengths[_task_name(t)].append(n)
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
    """Write ``sequence.txt`` (documents as text, targets shown) and each image as a PNG file.

    Files an earlier inspect left in ``out`` (``INSPECT_FILES``) are replaced; other files stay."""
    from PIL import Image

    manifest = load_manifest(root)
    layout = _layout(root, manifest)
    row = _find_row(root, manifest, layout, task, index)
    tok = _inspect_tokenizer(root, manifest, tokenizer_path, row)
    # Everything that can fail on the build's side fails before --out is touched.
    images = []
    for prefix, col in (("und", COL_UND_IMAGES), ("gen", COL_GEN_IMAGES)):
        for i, data in enumerate(row[col]):
            try:
                images.append((f"{prefix}-{i:02d}.png", decode_image(data)))
            except Exception as e:  # PIL raises many types for bytes that are no image
                raise LookError(f"{task} sequence {index}: {col}[{i}] does not decode ({type(e).__name__}); "
                                f"{_verify_hint(root)}") from None
    latents = []
    for i, data in enumerate(row.get(COL_GEN_LATENTS) or []):
        try:
            latent = decode_latent(data, row[COL_GEN_LATENT_DTYPE], layout.latent_shape)
        except (ValueError, TypeError) as e:  # bytes of another length or dtype than the layout's
            raise LookError(f"{task} sequence {index}: {COL_GEN_LATENTS}[{i}] does not decode ({e}); "
                            f"{_verify_hint(root)}") from None
        latents.append((f"gen-{i:02d}-latent.npy", latent))
    _prepare_out(out)
    ids = np.asarray(row[COL_INPUT_IDS])
    kinds = np.asarray(row[COL_TOKEN_KIND])
    targets = np.asarray(row[COL_TARGET_MASK])
    written, lines = [], [f"{task} sequence {index}: {len(ids)} tokens, {len(row[COL_DOC_LENGTHS])} documents"]
    und_i = gen_i = 0
    start = 0
    keys = row.get(COL_DOC_KEYS) or [""] * len(row[COL_DOC_LENGTHS])
    for d, (length, dtask, key) in enumerate(zip(row[COL_DOC_LENGTHS], row[COL_DOC_TASKS], keys)):
        sl = slice(start, start + length)
        lines.append(f"\n=== document {d}: {_task_name(dtask)}, {length} tokens, {key} ===")
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
                codes = ids[a:b]
                np.save(path, codes.reshape(layout.code_grid) if layout.code_grid and
                        codes.size == layout.code_grid[0] * layout.code_grid[1] else codes)
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
    for name, pixels in images:
        path = os.path.join(out, name)
        Image.fromarray(pixels).save(path)
        written.append(path)
    for name, latent in latents:
        path = os.path.join(out, name)
        np.save(path, latent)
        written.append(path)
    text_path = os.path.join(out, "sequence.txt")
    with open(text_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return [text_path] + written


def _task_name(value: int) -> str:
    try:
        return Task(value).name.lower()
    except ValueError:
        return f"unknown task {value}"


def _prepare_out(out: str) -> None:
    """``out`` as an empty-of-inspect-files folder (``LookError`` naming --out when it cannot be)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise LookError(f"--out {out}: a file, not a folder; give a folder for sequence.txt and the PNG files")
    try:
        os.makedirs(out, exist_ok=True)
        for name in os.listdir(out):
            if INSPECT_FILES.match(name) and os.path.isfile(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
        if not os.access(out, os.W_OK):
            raise PermissionError(13, "permission denied", out)
    except OSError as e:
        raise LookError(f"--out {out}: {(e.strerror or str(e)).lower()}; give a folder you can write to") from None


def _inspect_tokenizer(root: str, manifest: dict, path: Optional[str], row: dict):
    """The tokenizer to decode ``row`` with, refused when it cannot be the build's: other special-token
    ids than the manifest records, fewer tokens than the sequence uses, or, when the manifest records
    the tokenizer's files (builds since they are fingerprinted), other files (a tokenizer of the same
    size and special ids trained on other texts decodes garbage too)."""
    from datacontract.tokenizer import (
        DEFAULT_BEGIN_OF_IMAGE,
        DEFAULT_END_OF_IMAGE,
        DEFAULT_IMAGE_PLACEHOLDER,
        load_tokenizer,
        resolve_token_spec,
    )

    config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    where = "--tokenizer" if path else f"the build's tokenizer (config.tokenizer of {os.path.join(root, MANIFEST_NAME)})"
    if not path:
        path = config.get("tokenizer")
        if not isinstance(path, str) or not path:
            raise LookError(f"{os.path.join(root, MANIFEST_NAME)}: no config.tokenizer; give --tokenizer DIR")
    try:
        tok = load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise LookError(f"{where}: {e}; give --tokenizer the folder of the tokenizer the build used") from None
    differences = []
    special = manifest.get("special_tokens")
    if isinstance(special, dict):
        try:
            spec = resolve_token_spec(tok, config.get("begin_of_image") or DEFAULT_BEGIN_OF_IMAGE,
                                      config.get("end_of_image") or DEFAULT_END_OF_IMAGE,
                                      config.get("image_placeholder") or DEFAULT_IMAGE_PLACEHOLDER,
                                      config.get("pad_token"))
            differences += [f"{k} {getattr(spec, k)}, the build's {v}" for k, v in sorted(special.items())
                            if hasattr(spec, k) and getattr(spec, k) != v]
        except ValueError as e:
            differences.append(str(e))
    ids = np.asarray(row[COL_INPUT_IDS])
    text = ids[np.asarray(row[COL_TOKEN_KIND]) == TokenKind.TEXT]
    if text.size and int(text.max()) >= len(tok):
        differences.append(f"the sequence uses token {int(text.max())}, it has {len(tok)} tokens")
    if not differences:  # the reasons above say what is wrong in tokens; a file only that something is
        differences += _tokenizer_file_differences(manifest, path)
    if differences:
        raise LookError(f"{where} {path} is not the tokenizer of this build ({'; '.join(differences)}); give "
                        "--tokenizer the folder of the tokenizer the build used")
    return tok


def _tokenizer_file_differences(manifest: dict, path: str) -> List[str]:
    """How the tokenizer files in ``path`` differ from those the build fingerprinted (empty when the
    same, or when the manifest, made before they were fingerprinted, cannot tell)."""
    recorded = manifest.get("input_fingerprints")
    entries = [e for e in recorded if isinstance(e, dict) and e.get("format") == "tokenizer"] \
        if isinstance(recorded, list) else []
    built = entries[0].get("files") if entries else None
    if not isinstance(built, dict):
        return []
    try:
        files = tokenizer_fingerprint(path)["files"]
    except OSError as e:
        return [f"{e.filename or path} cannot be read ({(e.strerror or str(e)).lower()})"]
    changes = file_changes(built, files)  # "tokenizer.json content changed", "merges.txt added", ...
    return [f"its files differ from the build's: {', '.join(changes)}"] if changes else []


def _find_row(root: str, manifest: dict, layout: ShardLayout, task: str, index: int) -> dict:
    counts = {name: sum(s["rows"] for s in e["shards"]) for name, e in manifest["tasks"].items()}
    total = counts.get(task, 0)
    if total == 0:
        have = [name for name, n in counts.items() if n]
        hint = f"--task {' or '.join(have)}" if have else "it holds no sequence at all: rebuild it"
        raise LookError(f"the build in {root} has no {task} sequences; {hint}")
    if not 0 <= index < total:
        raise LookError(f"--index {index}: the build has {total} {task} sequences, 0 to {total - 1}")
    remaining = index
    for shard in manifest["tasks"][task]["shards"]:
        if remaining < shard["rows"]:
            return _open_shard(root, shard, layout).read_row(remaining)
        remaining -= shard["rows"]
    raise AssertionError("unreachable: index < total")


__all__ = ["stats", "format_stats", "inspect", "load_manifest", "LookError"]
