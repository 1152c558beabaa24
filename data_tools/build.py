"""The offline build: raw inputs -> packed multimodal shards + manifest, in two resumable phases.

Phase 1 (parallel over input chunks): read records, apply the image rules, tokenize, optionally
encode VAE latents (JanusFlow) or image codes (Janus-Pro, ``codes.py``), and write one *document file* per chunk (``.work/docs/chunk-NNNNNN.arrow``,
one row per document) plus its rejects. Phase 2: plan the packing over the lengths of all
documents (``packing.py``), then write the packed shards (parallel over shards). The units of work
of both phases, and the per-process state they share, are ``build_units.py``; this module plans,
runs and checks them.

Resumption: every unit of work (a chunk, a shard) is written under a temporary name, renamed into
place, and only then marked done by a small JSON file. A re-run of the same command skips every
unit marked done, deletes what an interrupted unit left behind, and recomputes the (deterministic)
plan, so it finishes the missing shards without duplicating any. A re-run with different options
is refused (``--overwrite`` starts over).

Determinism: chunks are cut from the inputs alone (not from ``--workers``), every random choice is
seeded by (seed, record identity), and output names derive from input order, so the same inputs
and options give the same shards, byte for byte, whatever the number of workers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa

from datacontract.format import Task
from datacontract.shards import MANIFEST_NAME, REJECTS_NAME, TASK_DIRS, ShardLayout

from .build_config import BuildConfig
from .build_units import (
    WORK_DIR,
    atomic_write_json,
    chunk_paths,
    document_builder,
    init_worker,
    run_chunk,
    run_shard,
    shard_rel,
    use_inline_progress,
)
from .packing import plan_packing
from .sources import Chunk, expand_inputs, plan_chunks
from .errors import BuildError
from .state import (
    FolderLock,
    describe_changes,
    input_fingerprints,
    owned_files,
    remove_dir_if_empty,
    remove_owned,
    tokenizer_fingerprint,
    vae_fingerprint,
)
from .workers import run_units

FORMAT_VERSION = "janusflow-packed/1"


# ------------------------------------------------------------------------------------ small helpers


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class _Progress:
    """Progress on stderr, fed from worker processes: a tqdm bar on a terminal, else one log line
    every ``log_every`` seconds (batch jobs write to files), nothing with --quiet."""

    def __init__(self, quiet: bool, log_every: float = 30.0) -> None:
        self.quiet = quiet
        self.tty = not quiet and sys.stderr.isatty()
        self.log_every = log_every
        self.bar = None

    def start(self, desc: str, total, unit: str) -> None:
        self.desc, self.total, self.unit, self.done = desc, total, unit, 0
        self.t0 = self.last = time.monotonic()
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif not self.quiet and time.monotonic() - self.last >= self.log_every:
            self.last = time.monotonic()
            self._line()

    def _line(self) -> None:
        rate = self.done / max(1e-9, time.monotonic() - self.t0)
        of = f"/{self.total} ({100 * self.done / self.total:.0f}%)" if self.total else ""
        print(f"{self.desc}: {self.done}{of} {self.unit}, {rate:.1f} {self.unit}/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif not self.quiet and getattr(self, "done", 0):
            self._line()


def _log(cfg: BuildConfig, message: str) -> None:
    if not cfg.quiet:
        print(message, file=sys.stderr)



# ------------------------------------------------------------------------------------ orchestration


def _records_in_chunk(chunk: Chunk) -> int:
    """Records a chunk holds, for progress totals (tars: counted from their headers when local)."""
    if chunk.fmt in ("wds", "classwds"):
        from .archive import count_tar_records

        return count_tar_records(chunk.path) or 0
    return chunk.stop - chunk.start


def _describe_unit(unit) -> str:
    if isinstance(unit, Chunk):
        return f"chunk {unit.index} ({unit.path}, records {unit.start}..{unit.stop})"
    return f"shard {TASK_DIRS[unit[0]]}/{unit[1]:05d}"


def _run_units(cfg: BuildConfig, fn, units: list, progress: "_Progress", lock: FolderLock) -> list:
    """Run ``fn`` over ``units`` inline (1 worker) or in worker processes; results in unit order."""
    if not units:
        return []
    if cfg.workers <= 1:
        use_inline_progress(progress)
        return [fn(u) for u in units]
    # The VAE and the image codec may use CUDA, which must not be initialised in a forked child, and
    # torch's thread pools are not safe to fork once used: spawn in that case.
    spawn = bool(cfg.vae or cfg.codec)
    return run_units(fn, units, cfg.workers, init_worker, (cfg,), progress.update, _describe_unit,
                     start_method="spawn" if spawn else "fork",
                     # A forked worker inherits the lock's descriptor: it closes its copy. A spawned
                     # one inherits nothing (and the number may name another file there).
                     close_fds=[] if spawn else [lock.fd])


def _versions(with_vae: bool, with_codec: bool = False) -> dict:
    import PIL
    import tokenizers
    import transformers

    v = {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "pyarrow": pa.__version__,
        "pillow": PIL.__version__,
        "tokenizers": tokenizers.__version__,
        "transformers": transformers.__version__,
    }
    if with_vae:
        import diffusers

        v.update(diffusers=diffusers.__version__)
    if with_vae or with_codec:
        import torch

        v.update(torch=torch.__version__)
    return v


def _discard_build(out: str) -> None:
    """--overwrite: delete what a build writes in ``out`` (never other files)."""
    work = os.path.join(out, WORK_DIR)
    for sub, kind in (("docs", "docs"), ("shards", "shards")):
        remove_owned(os.path.join(work, sub), kind)
        remove_dir_if_empty(os.path.join(work, sub))
    for name in os.listdir(work) if os.path.isdir(work) else []:
        if name.startswith("debug-killed-"):
            os.remove(os.path.join(work, name))
    remove_owned(work, "work")
    remove_dir_if_empty(work)
    for d in TASK_DIRS.values():
        remove_owned(os.path.join(out, d), "task")
        remove_dir_if_empty(os.path.join(out, d))
    remove_owned(out, "root")


def _has_finished_units(work: str) -> bool:
    return bool(owned_files(os.path.join(work, "docs"), "docs") or owned_files(os.path.join(work, "shards"), "shards"))


def _knows_tokenizer_content(fingerprints: list) -> bool:
    return any(isinstance(e, dict) and e.get("format") == "tokenizer" for e in fingerprints)


def _same_options(saved, identity: dict, saved_fingerprints: list, fingerprints: list) -> bool:
    """Whether a saved ``identity()`` is this run's. The tokenizer's path does not count when both
    fingerprint lists hold the tokenizer's content (``describe_changes`` compares that): a tokenizer
    moved or copied elsewhere gives the same token ids, so its build is resumed or reused. Builds
    made before the content was recorded are known by the path alone, which is then compared."""
    if saved == identity:
        return True
    if not (isinstance(saved, dict) and _knows_tokenizer_content(saved_fingerprints)
            and _knows_tokenizer_content(fingerprints)):
        return False
    return dict(saved, tokenizer=None) == dict(identity, tokenizer=None)


def _check_state(cfg: BuildConfig, identity: dict, fingerprints: list) -> Optional[dict]:
    """Decide what the state in ``--out`` allows: a finished manifest to return, a resume, a fresh
    start, or a refusal (``BuildError``) that names the reason."""
    out, work = cfg.out, os.path.join(cfg.out, WORK_DIR)
    manifest_path = os.path.join(out, MANIFEST_NAME)
    if os.path.exists(manifest_path):
        done = _read_json(manifest_path)
        if not _same_options(done.get("config"), identity, done.get("input_fingerprints", []), fingerprints):
            raise BuildError(f"{out} holds a finished build with other options: use another --out or --overwrite")
        changes = describe_changes(done.get("input_fingerprints", []), fingerprints)
        if changes:
            raise BuildError(f"{out} holds a finished build of other input files ({'; '.join(changes[:5])}"
                             f"{'; ...' if len(changes) > 5 else ''}): re-run with --overwrite to rebuild")
        return done
    config_path = os.path.join(work, "config.json")
    inputs_path = os.path.join(work, "inputs.json")
    if os.path.exists(config_path):
        started = _has_finished_units(work)
        saved_inputs = _read_json(inputs_path) if started and os.path.exists(inputs_path) else None
        if not _same_options(_read_json(config_path), identity, saved_inputs or [], fingerprints):
            if started:
                raise BuildError(f"{out} holds an unfinished build with other options: re-run it with its own "
                                 "options to finish it, or use another --out or --overwrite")
            _discard_build(out)  # a start that failed before any work: nothing worth keeping
        elif saved_inputs is not None:
            changes = describe_changes(saved_inputs, fingerprints)
            if changes:
                raise BuildError(f"cannot resume the build in {out}: its inputs changed since it was interrupted "
                                 f"({'; '.join(changes[:5])}{'; ...' if len(changes) > 5 else ''}); restore them, "
                                 "or re-run with --overwrite to start over")
    else:
        stray = [f"{d}/{n}" for d in TASK_DIRS.values() for n in owned_files(os.path.join(out, d), "task")]
        if stray:
            raise BuildError(f"{out} holds shard files of an unknown build ({', '.join(stray[:3])}"
                             f"{', ...' if len(stray) > 3 else ''}): use another --out, or --overwrite to replace them")
    return None


def build(cfg: BuildConfig) -> dict:
    """Run (or finish) a build; returns the manifest.

    Everything that a typo can break (tokenizer, special tokens, input globs, the VAE config) is
    checked before ``--out`` is touched, so a failed start leaves nothing behind.
    """
    codec = _codec_description(cfg)
    if codec is not None:  # the codes' grid is the codec's: one code per downsample x downsample pixels
        try:
            layout = dataclasses.replace(cfg.layout, gen_downsample=int(codec["downsample"]), gen_patch=1)
        except ValueError:
            raise BuildError(f"--resolution {cfg.layout.resolution} is not a multiple of the codec's downsampling "
                             f"{codec['downsample']} (--codec-path {cfg.codec_path})") from None
        cfg = dataclasses.replace(cfg, layout=layout)
    init_worker(cfg, None)
    try:
        spec = document_builder().spec
    except (OSError, ValueError) as e:
        raise BuildError(f"--tokenizer {cfg.tokenizer}: {e}") from None
    files = expand_inputs(cfg.inputs)
    latent_shape = _vae_latent_shape(cfg) if cfg.vae else None
    fingerprints = _all_fingerprints(cfg, files, codec)
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise BuildError(f"--out {cfg.out} is a file, not a folder")
    os.makedirs(cfg.out, exist_ok=True)
    with FolderLock(cfg.out) as lock:
        if cfg.overwrite:
            _discard_build(cfg.out)
        identity = cfg.identity()
        done = _check_state(cfg, identity, fingerprints)
        if done is not None:
            _log(cfg, f"{cfg.out}: already complete ({os.path.join(cfg.out, MANIFEST_NAME)})")
            return done
        return _build_locked(cfg, identity, spec, files, fingerprints, latent_shape, codec, lock)


def _codec_description(cfg: BuildConfig) -> Optional[dict]:
    """The image codec's ``describe()`` (loaded once here, so a bad --codec-path fails before --out
    is touched), None without a codec."""
    if cfg.family == "januspro" and cfg.codec is None:
        raise BuildError("--family januspro needs --codec and --codec-path (the image tokenizer of the codes)")
    if cfg.codec is None:
        return None
    if cfg.family != "januspro":
        raise BuildError(f"--codec {cfg.codec}: image codes are Janus-Pro's; add --family januspro")
    if not cfg.codec_path:
        raise BuildError(f"--codec {cfg.codec} needs --codec-path (a local file or folder)")
    from .codes import CodeEncoder

    try:
        return CodeEncoder(cfg.codec, cfg.codec_path, "cpu").describe()
    except (OSError, ValueError, KeyError) as e:
        raise BuildError(f"--codec-path {cfg.codec_path}: {e}") from None


def _codec_fingerprint(cfg: BuildConfig, codec: Optional[dict]) -> List[dict]:
    """The codec as one more input (compared on resume: other weights give other codes)."""
    if codec is None:
        return []
    return [{"path": cfg.codec_path, "format": "codec", "task": -1, **codec}]


def _all_fingerprints(cfg: BuildConfig, files: list, codec: Optional[dict]) -> List[dict]:
    """The data inputs, then every other input the output bytes derive from: the image codec, the
    tokenizer (other files, other token ids) and the VAE (other weights, other latents)."""
    try:
        extra = [tokenizer_fingerprint(cfg.tokenizer)] + ([vae_fingerprint(cfg.vae)] if cfg.vae else [])
    except OSError as e:  # an unreadable file in either folder: one line, not a traceback
        raise BuildError(f"{e.filename or cfg.tokenizer}: cannot read it ({e.strerror or e}); check the "
                         "--tokenizer and --vae folders") from None
    return input_fingerprints(files) + _codec_fingerprint(cfg, codec) + extra


def _build_locked(cfg, identity, spec, files, fingerprints, latent_shape, codec, lock) -> dict:
    out, work = cfg.out, os.path.join(cfg.out, WORK_DIR)
    for sub in ("docs", "shards"):
        os.makedirs(os.path.join(work, sub), exist_ok=True)
    atomic_write_json(os.path.join(work, "config.json"), identity)
    atomic_write_json(os.path.join(work, "inputs.json"), fingerprints)
    chunks = plan_chunks(cfg.inputs, cfg.chunk_records, files)
    _log(cfg, f"planned {len(chunks)} chunk(s) from {len(files)} input file(s)")

    # ---- phase 1: documents per chunk
    keep = set()
    pending: List[Chunk] = []
    for c in chunks:
        docs_path, rejects_path, marker_path = chunk_paths(work, c.index)
        if os.path.exists(marker_path) and os.path.exists(docs_path) and \
                _read_json(marker_path).get("docs_bytes") == os.path.getsize(docs_path):
            keep.update(os.path.basename(p) for p in (docs_path, rejects_path, marker_path))
        else:
            pending.append(c)
    remove_owned(os.path.join(work, "docs"), "docs", frozenset(keep))
    if len(pending) < len(chunks):
        _log(cfg, f"resuming: {len(chunks) - len(pending)} chunk(s) already done")
    known = sum(_records_in_chunk(c) for c in pending)
    progress = _Progress(cfg.quiet, cfg.log_every)
    progress.start("documents", known or None, "rec")
    try:
        _run_units(cfg, run_chunk, pending, progress, lock)
    finally:
        progress.close()
    markers = [_read_json(chunk_paths(work, c.index)[2]) for c in chunks]

    # ---- phase 2: plan, then shards
    import pyarrow.ipc as ipc

    docs: List[Tuple[int, Task, int]] = []
    chunk_ids, chunk_starts = [], []
    for c in chunks:
        chunk_ids.append(c.index)
        chunk_starts.append(len(docs))
        table = ipc.open_file(pa.memory_map(chunk_paths(work, c.index)[0], "r")).read_all(
        ).select(["task", "length"])
        for task, length in zip(table.column("task").to_pylist(), table.column("length").to_pylist()):
            docs.append((len(docs), Task(task), length))
    plan = plan_packing(docs, cfg.layout.seq_length, cfg.pack_window, cfg.text_fillers, cfg.min_filler,
                        cfg.text_reserve)
    layout = ShardLayout(
        seq_length=cfg.layout.seq_length,
        resolution=cfg.layout.resolution,
        und_tokens_per_image=cfg.layout.und_tokens,
        gen_tokens_per_image=cfg.layout.gen_tokens,
        latent_shape=latent_shape,
        latent_dtype=cfg.latent_dtype if cfg.vae else None,
        family=cfg.family,
        pad_id=spec.pad_id if cfg.family == "januspro" else None,
        image_codec=codec,
    )
    jobs = []
    for task in Task:
        bins = plan.bins[task]
        for index, start in enumerate(range(0, len(bins), cfg.shard_rows)):
            jobs.append((task, index, bins[start : start + cfg.shard_rows], chunk_ids, chunk_starts,
                         layout.to_json()))
    for task in Task:
        if plan.bins[task]:
            os.makedirs(os.path.join(out, TASK_DIRS[task]), exist_ok=True)
    keep_shards, keep_markers, todo = {t: set() for t in Task}, set(), []
    for job in jobs:
        task, index = job[0], job[1]
        rel = shard_rel(task, index)
        marker_path = os.path.join(work, "shards", f"{TASK_DIRS[task]}-{index:05d}.json")
        path = os.path.join(out, rel)
        if os.path.exists(marker_path) and os.path.exists(path) and \
                _read_json(marker_path).get("bytes") == os.path.getsize(path):
            keep_shards[task].add(os.path.basename(rel))
            keep_markers.add(os.path.basename(marker_path))
        else:
            todo.append(job)
    for task in Task:
        remove_owned(os.path.join(out, TASK_DIRS[task]), "task", frozenset(keep_shards[task]))
    remove_owned(os.path.join(work, "shards"), "shards", frozenset(keep_markers))
    progress.start("sequences", sum(len(j[2]) for j in todo), "seq")
    try:
        _run_units(cfg, run_shard, todo, progress, lock)
    finally:
        progress.close()
    shard_markers = [
        _read_json(os.path.join(work, "shards", f"{TASK_DIRS[j[0]]}-{j[1]:05d}.json")) for j in jobs
    ]
    # The inputs must still be the ones the plan was cut from.
    changes = describe_changes(fingerprints, _all_fingerprints(cfg, files, codec))
    if changes:
        raise BuildError(f"inputs changed while the build read them ({'; '.join(changes[:5])}): "
                         "re-run with --overwrite once they are stable")
    manifest = _assemble_manifest(cfg, identity, spec, layout, chunks, markers, shard_markers, plan)
    manifest["input_fingerprints"] = fingerprints
    _merge_rejects(work, chunks, os.path.join(out, REJECTS_NAME))
    atomic_write_json(os.path.join(out, MANIFEST_NAME), manifest)
    if not cfg.keep_work:
        _discard_work(work)
    t = manifest["totals"]
    _log(cfg, f"done: {t['sequences']} sequences, {t['tokens']} tokens, fill {t['fill']:.4f}, "
              f"records in {t['records_in']} = written {t['records_written']} + rejected {t['records_rejected']}")
    return manifest


def _discard_work(work: str) -> None:
    for sub, kind in (("docs", "docs"), ("shards", "shards")):
        remove_owned(os.path.join(work, sub), kind)
        remove_dir_if_empty(os.path.join(work, sub))
    for name in os.listdir(work):
        if name.startswith("debug-killed-"):
            os.remove(os.path.join(work, name))
    remove_owned(work, "work")
    remove_dir_if_empty(work)


def useless_build_problems(manifest: dict) -> List[str]:
    """Why a finished build is of no use (empty list: it is fine): nothing written at all, or an input
    flag none of whose records was written (e.g. LLaVA images not found under the image root)."""
    problems = []
    t = manifest["totals"]
    groups: Dict[tuple, List[dict]] = {}
    for e in manifest["inputs"]:
        groups.setdefault((e["format"], e["task"]), []).append(e)
    for (fmt, task), entries in groups.items():
        if any(e["records_written"] for e in entries) or not any(e["records_in"] for e in entries):
            continue
        reasons = Counter()
        for e in entries:
            reasons.update(e["rejects_by_reason"])
        top = ", ".join(f"{r} {n}" for r, n in reasons.most_common(3))
        names = ", ".join(e["path"] for e in entries[:3]) + (", ..." if len(entries) > 3 else "")
        hint = ""
        if reasons and reasons.most_common(1)[0][0] == "missing_image_file":
            llava = [r for r in manifest["config"]["inputs"] if r["fmt"] == "llava"]
            root = next((r["image_root"] for r in llava if r.get("image_root")), None)
            hint = (f"; images were looked up under {root}" if root else
                    "; images were looked up next to the JSON file") + " - set --llava-image-root"
        elif reasons and reasons.most_common(1)[0][0] == "too_long":
            hint = f"; raise --seq-length (now {manifest['layout']['seq_length']})"
        problems.append(f"no record of the {task} {fmt} input ({names}) was written: {top}{hint}; "
                        f"see {REJECTS_NAME}")
    if t["records_written"] == 0 and not problems:
        problems.append(f"no record was written ({t['records_rejected']} rejected); see {REJECTS_NAME}")
    return problems


def _vae_latent_shape(cfg: BuildConfig) -> tuple:
    # Read from the VAE config (no weights needed): channels and the downsampling factor.
    cfg_path = os.path.join(cfg.vae, "config.json")
    vc = _read_json(cfg_path)
    factor = 2 ** (len(vc["block_out_channels"]) - 1)
    size = cfg.layout.resolution // factor
    return (int(vc["latent_channels"]), size, size)


def _merge_rejects(work: str, chunks: List[Chunk], path: str) -> None:
    with open(path + ".tmp", "wb") as out:
        for c in chunks:
            with open(chunk_paths(work, c.index)[1], "rb") as f:
                shutil.copyfileobj(f, out)
    os.replace(path + ".tmp", path)


def _assemble_manifest(cfg, identity, spec, layout, chunks, markers, shard_markers, plan) -> dict:
    inputs: Dict[str, dict] = {}
    for c, m in zip(chunks, markers):
        e = inputs.setdefault((c.path, c.fmt, c.task), {
            "path": c.path, "format": c.fmt, "task": TASK_DIRS[Task(c.task)], "chunks": 0,
            "records_in": 0, "records_written": 0, "records_rejected": 0, "records_truncated": 0,
            "rejects_by_reason": Counter(),
        })
        e["chunks"] += 1
        for k in ("records_in", "records_written", "records_rejected", "records_truncated"):
            e[k] += m[k]
        e["rejects_by_reason"].update(m["rejects_by_reason"])
    for e in inputs.values():
        e["rejects_by_reason"] = dict(sorted(e["rejects_by_reason"].items()))
    tasks = {}
    for task in Task:
        name = TASK_DIRS[task]
        shards = [{k: s[k] for k in ("path", "rows", "tokens", "bytes", "sha256")}
                  for s in shard_markers if s["task"] == name]
        docs = Counter()
        for s in shard_markers:
            if s["task"] == name:
                docs.update(s["documents"])
        seqs = sum(s["rows"] for s in shards)
        toks = sum(s["tokens"] for s in shards)
        tasks[name] = {
            "sequences": seqs,
            "tokens": toks,
            "fill": toks / (seqs * layout.seq_length) if seqs else 0.0,
            "documents": dict(sorted(docs.items())),
            "shards": shards,
        }
    seqs = sum(t["sequences"] for t in tasks.values())
    toks = sum(t["tokens"] for t in tasks.values())
    rejects = Counter()
    for e in inputs.values():
        rejects.update(e["rejects_by_reason"])
    totals = {
        "records_in": sum(e["records_in"] for e in inputs.values()),
        "records_written": sum(e["records_written"] for e in inputs.values()),
        "records_rejected": sum(e["records_rejected"] for e in inputs.values()),
        "records_truncated": sum(e["records_truncated"] for e in inputs.values()),
        "sequences": seqs,
        "tokens": toks,
        "fill": toks / (seqs * layout.seq_length) if seqs else 0.0,
        "filler_tokens": plan.filler_tokens,
    }
    return {
        "format": FORMAT_VERSION,
        "command": list(cfg.command),
        "versions": _versions(cfg.vae is not None, cfg.codec is not None),
        "config": identity,
        "layout": layout.to_json(),
        "special_tokens": asdict(spec),
        "inputs": list(inputs.values()),
        "totals": totals,
        "tasks": tasks,
        "rejects": {"path": REJECTS_NAME, "count": totals["records_rejected"],
                    "by_reason": dict(sorted(rejects.items()))},
    }
