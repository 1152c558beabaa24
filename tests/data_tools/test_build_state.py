"""What a build trusts and what it touches in --out: input fingerprints on resume, other people's
files, the folder lock, failed starts, and workers that die (the reference is always the
uninterrupted build of the same inputs, byte for byte)."""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from data_tools.cli import main
from data_tools.state import FolderLock
from data_tools.synthetic import make_corpus, tiny_build_args
from datacontract.shards import read_manifest
from tests.data_fixtures import foreign_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _shard_bytes(out):
    return {os.path.relpath(p, out): open(p, "rb").read() for p in sorted(glob.glob(os.path.join(out, "*", "*.arrow")))}


def _args(corpus, tok, out, *extra):
    return tiny_build_args(corpus, tok, out, "--shard-rows", "1", "--chunk-records", "3", *extra)


def _killed_run(corpus, tok, out, after):
    """A build in a subprocess that SIGKILLs itself after ``after`` units (chunks, then shards)."""
    cmd = [sys.executable, "-m", "data_tools", *_args(corpus, tok, out, "--debug-kill-after", str(after))]
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True)
    assert r.returncode == -9, r.stderr.decode()


@pytest.fixture
def own_corpus(tmp_path):
    corpus = make_corpus(str(tmp_path / "raw"), n_und=6, n_gen=3, n_llava=2, n_text=7)
    corpus["und_wds"] = corpus["und_wds"].replace("und-000", "und-00*")  # a glob, as users give
    return corpus


@pytest.fixture
def reference(own_corpus, tokenizer_dir, tmp_path):
    out = str(tmp_path / "ref")
    assert main(_args(own_corpus, tokenizer_dir, out)) == 0
    return _shard_bytes(out)


def _append_text(corpus):
    with open(corpus["text_jsonl"], "a") as f:
        f.write('{"text": "one more line makes the file grow"}\n')


def _replace_text(corpus):
    data = open(corpus["text_jsonl"]).read()
    with open(corpus["text_jsonl"], "w") as f:
        f.write(data.replace("a", "b"))  # same size, other content


def _add_tar(corpus):
    shutil.copy(corpus["und_wds"].replace("*", "0"), corpus["und_wds"].replace("*", "1"))


@pytest.mark.parametrize("change", ["grow", "replace", "add", "remove"])
def test_resume_refuses_changed_inputs_naming_them(own_corpus, tokenizer_dir, tmp_path, capsys, change):
    out = str(tmp_path / "out")
    if change == "remove":
        _add_tar(own_corpus)
    _killed_run(own_corpus, tokenizer_dir, out, 3)
    if change == "grow":
        _append_text(own_corpus)
        named = "text.jsonl"
    elif change == "replace":
        _replace_text(own_corpus)
        named = "text.jsonl"
    elif change == "add":
        _add_tar(own_corpus)
        named = "added"
    else:
        os.remove(own_corpus["und_wds"].replace("*", "1"))
        named = "removed"
    capsys.readouterr()
    assert main(_args(own_corpus, tokenizer_dir, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot resume" in err and named in err and "--overwrite" in err
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    # --overwrite starts over and gives the build of the new inputs.
    assert main(_args(own_corpus, tokenizer_dir, out, "--overwrite")) == 0
    fresh = str(tmp_path / "fresh")
    assert main(_args(own_corpus, tokenizer_dir, fresh)) == 0
    assert _shard_bytes(out) == _shard_bytes(fresh)


def test_finished_build_refuses_grown_inputs(own_corpus, tokenizer_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(_args(own_corpus, tokenizer_dir, out)) == 0
    assert main(_args(own_corpus, tokenizer_dir, out)) == 0  # unchanged: already complete
    _append_text(own_corpus)
    capsys.readouterr()
    assert main(_args(own_corpus, tokenizer_dir, out)) == 2
    err = capsys.readouterr().err
    assert "text.jsonl" in err and "size" in err


def _replace_tokenizer(tok, tmp_path):
    """The files in ``tok`` replaced by those of a tokenizer of the same size and special ids."""
    other = foreign_tokenizer(tok, str(tmp_path / "foreign"))
    shutil.copy(os.path.join(other, "tokenizer.json"), os.path.join(tok, "tokenizer.json"))


def test_resume_refuses_a_replaced_tokenizer_naming_its_file(own_corpus, tokenizer_dir, tmp_path, capsys):
    """Before, the resumed build tokenized the missing chunks with the new tokenizer: two tokenizations
    in one data set, without a word."""
    tok, out = shutil.copytree(tokenizer_dir, str(tmp_path / "tok")), str(tmp_path / "out")
    _killed_run(own_corpus, tok, out, 3)
    _replace_tokenizer(tok, tmp_path)
    capsys.readouterr()
    assert main(_args(own_corpus, tok, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot resume" in err and "--overwrite" in err
    assert f"changed tokenizer {tok} (tokenizer.json content changed)" in err
    assert not os.path.exists(os.path.join(out, "manifest.json"))


def test_a_finished_build_refuses_a_replaced_tokenizer(own_corpus, tokenizer_dir, tmp_path, capsys):
    tok, out = shutil.copytree(tokenizer_dir, str(tmp_path / "tok")), str(tmp_path / "out")
    assert main(_args(own_corpus, tok, out)) == 0
    _replace_tokenizer(tok, tmp_path)
    capsys.readouterr()
    assert main(_args(own_corpus, tok, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "finished build" in err and "--overwrite" in err
    assert f"changed tokenizer {tok} (tokenizer.json content changed)" in err


def test_a_tokenizer_file_that_cannot_be_read_is_one_line(own_corpus, tokenizer_dir, tmp_path, capsys,
                                                          monkeypatch):
    """Fingerprinting reads every tokenizer (and VAE) file: an I/O error there is a refusal naming the
    file, not a traceback (as root, permissions cannot make a file unreadable: the read is made to fail)."""
    import data_tools.state

    bad = os.path.join(tokenizer_dir, "tokenizer.json")
    real_open = open

    def failing_open(path, *args, **kwargs):
        if os.fspath(path) == bad and "b" in (args[0] if args else kwargs.get("mode", "r")):
            raise OSError(5, "Input/output error", bad)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(data_tools.state, "open", failing_open, raising=False)
    out = str(tmp_path / "out")
    assert main(_args(own_corpus, tokenizer_dir, out)) == 2
    err = capsys.readouterr().err
    assert err == f"error: {bad}: cannot read it (Input/output error); check the --tokenizer and --vae folders\n"


def test_the_same_tokenizer_at_another_path_resumes_and_reuses_the_build(own_corpus, tokenizer_dir, tmp_path,
                                                                         capsys):
    """The tokenizer is known by its files: a moved or copied one (other modification times too) gives
    the same token ids, so the build goes on (before: refused as a build with other options)."""
    out = str(tmp_path / "out")
    _killed_run(own_corpus, tokenizer_dir, out, 3)
    moved = shutil.copytree(tokenizer_dir, str(tmp_path / "moved"), copy_function=shutil.copyfile)
    assert main(_args(own_corpus, moved, out)) == 0
    assert read_manifest(out)["config"]["tokenizer"] == moved
    again = shutil.copytree(tokenizer_dir, str(tmp_path / "again"), copy_function=shutil.copyfile)
    capsys.readouterr()
    assert main(_args(own_corpus, again, out)) == 0  # the finished build is reused
    # An other tokenizer at the new path still is another tokenizer.
    _replace_tokenizer(again, tmp_path)
    assert main(_args(own_corpus, again, out)) == 2
    assert f"changed tokenizer {again} (tokenizer.json content changed)" in capsys.readouterr().err


def _drop_tokenizer_entry(fingerprints):
    return [e for e in fingerprints if e["format"] != "tokenizer"]


def test_a_build_made_before_the_tokenizer_was_fingerprinted_resumes_and_is_reused(own_corpus, tokenizer_dir,
                                                                                   tmp_path):
    """Older state has no tokenizer entry: missing on one side is no change (demo re-runs on older
    output folders go on); the resumed build records the tokenizer from then on."""
    out = str(tmp_path / "out")
    _killed_run(own_corpus, tokenizer_dir, out, 3)
    inputs = os.path.join(out, ".work", "inputs.json")
    with open(inputs) as f:
        saved = json.load(f)
    with open(inputs, "w") as f:
        json.dump(_drop_tokenizer_entry(saved), f)
    assert main(_args(own_corpus, tokenizer_dir, out)) == 0
    manifest = read_manifest(out)
    assert [e["format"] for e in manifest["input_fingerprints"]][-1] == "tokenizer"
    manifest["input_fingerprints"] = _drop_tokenizer_entry(manifest["input_fingerprints"])
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    assert main(_args(own_corpus, tokenizer_dir, out)) == 0  # already complete


def test_same_file_for_two_tasks_has_two_manifest_entries(own_corpus, tokenizer_dir, tmp_path):
    out = str(tmp_path / "out")
    tar = own_corpus["und_wds"].replace("*", "0")
    args = _args({"und_wds": tar}, tokenizer_dir, out, "--gen-wds", tar, "--und-wds", tar)  # and once more for the same task: read once
    assert main(args) == 0
    m = read_manifest(out)
    entries = sorted((e["task"], e["records_in"], e["records_written"]) for e in m["inputs"])
    assert entries == [("gen", 6, 6), ("und", 6, 6)]
    assert m["totals"]["records_in"] == 12


def test_foreign_files_are_never_deleted(own_corpus, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "und").mkdir(parents=True)
    foreign = [out / "notes.txt", out / "und" / "README", out / "und" / "shard-1.arrow", out / ".work-notes"]
    for f in foreign:
        f.write_text("mine")
    assert main(_args(own_corpus, tokenizer_dir, str(out))) == 0
    assert main(_args(own_corpus, tokenizer_dir, str(out), "--overwrite", "--seed", "3")) == 0
    assert all(f.read_text() == "mine" for f in foreign)
    # Shard files with no build state: refused rather than mixed in or deleted.
    other = tmp_path / "other"
    (other / "gen").mkdir(parents=True)
    (other / "gen" / "shard-00000.arrow").write_bytes(b"someone else's")
    capsys.readouterr()
    assert main(_args(own_corpus, tokenizer_dir, str(other))) == 2
    assert "gen/shard-00000.arrow" in capsys.readouterr().err
    assert (other / "gen" / "shard-00000.arrow").read_bytes() == b"someone else's"


def test_a_second_build_in_the_same_folder_is_refused(own_corpus, tokenizer_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    os.makedirs(out)
    with FolderLock(out):
        assert main(_args(own_corpus, tokenizer_dir, out)) == 2
        err = capsys.readouterr().err
        assert "another build is running" in err and str(os.getpid()) in err
    assert main(_args(own_corpus, tokenizer_dir, out)) == 0


def test_failed_starts_leave_nothing_that_blocks_the_corrected_run(own_corpus, tokenizer_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    typo = dict(own_corpus, text_jsonl=own_corpus["text_jsonl"].replace("text", "txet*"))
    assert main(_args(typo, tokenizer_dir, out)) == 2
    assert "--text-jsonl" in capsys.readouterr().err
    assert main(_args(own_corpus, str(tmp_path / "no-tokenizer"), out)) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert not os.path.exists(out)  # nothing was written
    # State of a start that died before finishing any unit (older versions wrote it early).
    os.makedirs(os.path.join(out, ".work"))
    with open(os.path.join(out, ".work", "config.json"), "w") as f:
        f.write('{"tokenizer": "a typo"}')
    assert main(_args(own_corpus, tokenizer_dir, out)) == 0


@pytest.mark.slow
@pytest.mark.parametrize("unit", ["chunk:1", "shard:0"])
def test_a_killed_worker_is_replaced_and_the_output_is_unchanged(own_corpus, tokenizer_dir, tmp_path, reference,
                                                                unit):
    out = str(tmp_path / "out")
    assert main(_args(own_corpus, tokenizer_dir, out, "--workers", "2", "--debug-kill-worker", unit)) == 0
    assert _shard_bytes(out) == reference


@pytest.mark.slow
def test_a_unit_that_keeps_killing_its_worker_fails_clearly(own_corpus, tokenizer_dir, tmp_path, reference, capsys):
    out = str(tmp_path / "out")
    args = _args(own_corpus, tokenizer_dir, out, "--workers", "2")
    assert main(args + ["--debug-kill-worker", "chunk:2:always"]) == 2
    err = capsys.readouterr().err
    assert "chunk 2" in err and "killed its worker 3 times" in err and "SIGKILL" in err
    assert main(args) == 0
    assert _shard_bytes(out) == reference
