"""The CLI end to end: round trips, manifest, views, determinism and resumption after a kill."""

import glob
import os
import subprocess
import sys

import numpy as np
import pytest

from data_tools.cli import main
from datacontract.images import crop_seed, open_image, prepare_gen_image, prepare_und_image
from data_tools.sources import ReaderOptions, plan_chunks, read_chunk, InputSpec
from data_tools.synthetic import tiny_build_args
from data_tools.verify import verify
from data_tools.views import inspect, stats
from datacontract.format import Task, TokenKind
from datacontract.shards import COL_DOC_KEYS, ShardReader, decode_image, read_manifest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _documents(out, manifest):
    """Every document piece in the shards: key -> list of (start, ids, kinds, targets, und, gen)."""
    docs = {}
    for entry in manifest["tasks"].values():
        for shard in entry["shards"]:
            for row in ShardReader(os.path.join(out, shard["path"])).table.to_pylist():
                pos, und_i, gen_i = 0, 0, 0
                for n, task, key in zip(row["doc_lengths"], row["doc_tasks"], row[COL_DOC_KEYS]):
                    kinds = np.array(row["token_kind"][pos : pos + n])
                    n_und = int((kinds == TokenKind.UND_IMAGE_BEGIN).sum())
                    n_gen = int((kinds == TokenKind.GEN_TIME).sum())
                    name, _, start = key.partition("@")
                    docs.setdefault(name, []).append((
                        int(start or 0), row["input_ids"][pos : pos + n], kinds,
                        np.array(row["target_mask"][pos : pos + n]),
                        row["und_images"][und_i : und_i + n_und], row["gen_images"][gen_i : gen_i + n_gen], task,
                    ))
                    pos, und_i, gen_i = pos + n, und_i + n_und, gen_i + n_gen
    return {k: sorted(v, key=lambda x: x[0]) for k, v in docs.items()}


def _raw_records(corpus, fmt, task, key):
    spec = InputSpec(fmt, task, corpus[key], corpus.get("llava_image_root") if fmt == "llava" else None)
    return [r for c in plan_chunks([spec], 100) for r in read_chunk(c, ReaderOptions())]


def test_round_trip_every_input_kind(built, corpus, tokenizer):
    out, manifest = built
    docs = _documents(out, manifest)
    # understanding captions from a tar: text, targets and the padded image come back
    for rec in _raw_records(corpus, "wds", Task.UNDERSTANDING, "und_wds"):
        (piece,) = docs[f"und-000.tar:{rec.key}"]
        _, ids, kinds, tgt, und, gen, task = piece
        assert task == Task.UNDERSTANDING and len(und) == 1 and not gen
        assert tokenizer.decode(np.array(ids)[tgt.astype(bool)].tolist()) == f" {rec.caption}<eos>"
        expected = np.asarray(prepare_und_image(open_image(rec.images[0]), 32)).astype(int)
        assert np.abs(decode_image(und[0]).astype(int) - expected).mean() < 4
    # generation pairs from a tar and a parquet file: prompt and the seeded crop come back
    for fmt, key, name in (("wds", "gen_wds", "gen-000.tar"), ("parquet", "gen_parquet", "gen-000.parquet")):
        for rec in _raw_records(corpus, fmt, Task.GENERATION, key):
            (piece,) = docs[f"{name}:{rec.key}"]
            _, ids, kinds, tgt, und, gen, task = piece
            t = int(np.flatnonzero(kinds == TokenKind.GEN_TIME)[0])
            assert tokenizer.decode(ids[:t]) == f"<bos>User: {rec.caption}\n\nAssistant:"
            crop = prepare_gen_image(open_image(rec.images[0]), 32, crop_seed(0, f"{name}:{rec.key}"))
            assert np.abs(decode_image(gen[0]).astype(int) - np.asarray(crop).astype(int)).mean() < 4
    # llava conversations: every answer is a target
    for rec in _raw_records(corpus, "llava", Task.UNDERSTANDING, "llava"):
        (piece,) = docs[f"llava.json:{rec.key}"]
        _, ids, kinds, tgt, und, gen, _ = piece
        assert len(und) == 1
        assert tokenizer.decode(np.array(ids)[tgt.astype(bool)].tolist()) == "".join(f" {a}<eos>" for _, a in rec.turns)
    # text documents, possibly split into pieces across sequences, concatenate back exactly
    for rec in _raw_records(corpus, "jsonl", Task.TEXT, "text_jsonl"):
        pieces = docs[f"text.jsonl:{rec.key}"]
        ids = [i for p in pieces for i in p[1]]
        assert tokenizer.decode(ids) == f"<bos>{rec.text}<eos>"
        for start, _, _, tgt, *_ in pieces:
            assert tgt[0] == 0


def test_manifest_accounting_and_views(built, tmp_path):
    out, m = built
    assert m["totals"]["records_rejected"] == 0
    assert m["totals"]["records_in"] == m["totals"]["records_written"] == 6 + 6 + 6 + 4 + 6
    assert m["command"][:3] == ["python", "-m", "data_tools"] and "versions" in m
    assert set(m["tasks"]) == {"und", "gen", "text"}
    for entry in m["tasks"].values():
        assert all(len(s["sha256"]) == 64 for s in entry["shards"])
    assert verify(out) == []
    s = stats(out)
    assert s["tasks"]["und"]["documents"]["understanding"] == 10
    paths = inspect(out, "gen", 0, str(tmp_path / "insp"))
    text = open(paths[0]).read()
    assert "latent positions" in text and "User:" in text
    assert any(p.endswith(".png") for p in paths)


def test_verify_finds_a_corrupted_shard(built, tmp_path):
    import shutil

    out, m = built
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    path = os.path.join(copy, m["tasks"]["und"]["shards"][0]["path"])
    data = bytearray(open(path, "rb").read())
    data[-100] ^= 0xFF
    open(path, "wb").write(bytes(data))
    assert any("checksum" in p for p in verify(copy, decode=False))


def test_help_and_no_inputs(capsys):
    with pytest.raises(SystemExit) as e:
        main(["build", "--help"])
    assert e.value.code == 0 and "--seq-length" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["build", "--tokenizer", "x", "--out", "y"])


def _shard_bytes(out):
    return {os.path.relpath(p, out): open(p, "rb").read() for p in sorted(glob.glob(os.path.join(out, "*", "*.arrow")))}


def _manifest_without_command(out):
    m = read_manifest(out)
    m.pop("command")
    return m


def test_deterministic_whatever_the_worker_count(built, corpus, tokenizer_dir, tmp_path):
    out, _ = built
    again = str(tmp_path / "again")
    assert main(tiny_build_args(corpus, tokenizer_dir, again, "--workers", "2")) == 0
    assert _shard_bytes(again) == _shard_bytes(out)
    assert _manifest_without_command(again) == _manifest_without_command(out)
    # A re-run of a finished build does nothing; other options are refused.
    assert main(tiny_build_args(corpus, tokenizer_dir, again)) == 0
    assert main(tiny_build_args(corpus, tokenizer_dir, again, "--seed", "7")) == 2


@pytest.mark.slow
def test_resume_after_kills_gives_the_same_shards(corpus, tokenizer_dir, tmp_path):
    args = tiny_build_args(corpus, tokenizer_dir, str(tmp_path / "ref"), "--shard-rows", "1", "--chunk-records", "3")
    assert main(args) == 0
    reference = _shard_bytes(str(tmp_path / "ref"))
    out = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "data_tools",
           *tiny_build_args(corpus, tokenizer_dir, out, "--shard-rows", "1", "--chunk-records", "3")]
    env = dict(os.environ, PYTHONPATH=ROOT)
    # First kill in phase 1 (after 2 chunks, the 3rd chunk's documents written but not marked done) ...
    r = subprocess.run(cmd + ["--debug-kill-after", "2"], cwd=ROOT, env=env, capture_output=True)
    assert r.returncode == -9, r.stderr.decode()
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    # ... then in phase 2, after the remaining chunks and a few shards.
    specs = [InputSpec("wds", Task.UNDERSTANDING, corpus["und_wds"]), InputSpec("wds", Task.GENERATION, corpus["gen_wds"]),
             InputSpec("parquet", Task.GENERATION, corpus["gen_parquet"]), InputSpec("llava", Task.UNDERSTANDING, corpus["llava"]),
             InputSpec("jsonl", Task.TEXT, corpus["text_jsonl"])]
    remaining = len(plan_chunks(specs, 3)) - 2
    r = subprocess.run(cmd + ["--debug-kill-after", str(remaining + 2)], cwd=ROOT, env=env, capture_output=True)
    assert r.returncode == -9, r.stderr.decode()
    partial = _shard_bytes(out)
    assert 0 < len(partial) < len(reference)
    with open(os.path.join(out, "und", "shard-09999.arrow.tmp"), "wb") as f:
        f.write(b"left by a killed writer")
    assert main(tiny_build_args(corpus, tokenizer_dir, out, "--shard-rows", "1", "--chunk-records", "3")) == 0
    assert _shard_bytes(out) == reference
    assert not glob.glob(os.path.join(out, "*", "*.tmp"))
    assert verify(out, decode=False) == []
