"""Errors are one line naming the flag or file; useless builds exit non-zero and say why; progress
reaches log files; --help shows every default; outputs do not depend on the run or the folder."""

import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest

from data_tools.cli import build_parser, main
from data_tools.synthetic import make_corpus, tiny_build_args
from data_tools.views import inspect

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_corpus(str(tmp_path_factory.mktemp("raw")), n_und=3, n_gen=2, n_llava=2, n_text=3)


def test_input_and_output_mistakes_are_one_line(small, tokenizer_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    base = dict(small)
    cases = [
        (dict(base, text_jsonl=str(tmp_path / "nope" / "*.jsonl")), tokenizer_dir, out, ("--text-jsonl", "matches no file")),
        (dict(base, text_jsonl=str(tmp_path / "missing.jsonl")), tokenizer_dir, out, ("--text-jsonl", "no such file")),
        (dict(base, und_wds=os.path.dirname(small["und_wds"])), tokenizer_dir, out, ("--und-wds", "is a folder", "*.tar")),
        (base, str(tmp_path / "tok"), out, ("--tokenizer", "not a local directory")),
    ]
    for corpus, tok, o, needles in cases:
        assert main(tiny_build_args(corpus, tok, o)) == 2
        _one_line_error(capsys, *needles)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert main(tiny_build_args(base, tokenizer_dir, str(blocker))) == 2
    _one_line_error(capsys, "--out", "is a file")
    assert main(tiny_build_args(base, tokenizer_dir, str(blocker / "sub"))) == 2
    _one_line_error(capsys, str(blocker))
    with pytest.raises(SystemExit) as e:
        main(tiny_build_args(base, tokenizer_dir, out, "--shard-rows", "0"))
    assert e.value.code == 2 and "--shard-rows: 0 must be at least 1" in capsys.readouterr().err
    for bad, says in (("1.5", "1.5 must be between 0 and 1"), ("lots", "'lots' is not a number")):
        with pytest.raises(SystemExit) as e:
            main(tiny_build_args(base, tokenizer_dir, out, "--text-reserve", bad))
        assert e.value.code == 2 and f"--text-reserve: {says}" in capsys.readouterr().err


def test_builds_that_write_nothing_useful_exit_non_zero_saying_why(small, tokenizer_dir, tmp_path, capsys):
    args = tiny_build_args({"und_wds": small["und_wds"]}, tokenizer_dir, str(tmp_path / "long"), "--seq-length", "6")
    assert main(args) == 3
    _one_line_error(capsys, "too_long 3", "--seq-length")
    assert main(args) == 3  # and again when re-run on the finished build
    capsys.readouterr()
    # LLaVA images not found: the image root was forgotten; the message names where they were looked for.
    moved = tmp_path / "conv"
    moved.mkdir()
    shutil.copy(small["llava"], moved / "llava.json")
    args = tiny_build_args({"llava": str(moved / "llava.json"), "text_jsonl": small["text_jsonl"]}, tokenizer_dir,
                           str(tmp_path / "nollava"))
    assert main(args) == 3
    _one_line_error(capsys, "missing_image_file 2", "looked up next to the JSON file", "--llava-image-root")
    rejects = [json.loads(x) for x in open(tmp_path / "nollava" / "rejects.jsonl")]
    assert all(str(moved / "img00") in r["detail"] for r in rejects)  # the resolved path of each image


def test_progress_reaches_logs_with_tar_records_in_the_total(small, tokenizer_dir, tmp_path):
    args = [a for a in tiny_build_args(small, tokenizer_dir, str(tmp_path / "out")) if a != "--quiet"]
    r = subprocess.run([sys.executable, "-m", "data_tools", *args, "--log-every", "0"], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    total = 3 + 2 + 2 + 2 + 3  # und tar, gen tar, gen parquet, llava, text
    assert f"documents: {total}/{total} (100%) rec" in r.stderr
    assert "sequences: " in r.stderr


def test_help_shows_every_default():
    build = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "build")[1]
    text = build.format_help()
    for action in build._actions:
        if action.help == argparse.SUPPRESS or action.required or action.default in (None, False, [], argparse.SUPPRESS):
            continue
        if action.dest == "help":
            continue
        flag = action.option_strings[-1]
        section = text.split("options:", 1)[1].split("\n  " + flag, 1)[1].split("\n  -", 1)[0]
        assert "default" in section, flag


def test_rejects_are_the_same_on_every_run(tmp_path, tokenizer_dir):
    from data_tools.synthetic import write_tar

    members = [("a.jpg", b"\xff\xd8garbage"), ("a.txt", b"x"), ("b.png", b"\x89PNG\r\n\x1a\nbad"), ("b.txt", b"y"),
               ("c.gif", b"GIF89a"), ("c.txt", b"z")]
    write_tar(str(tmp_path / "bad.tar"), members)
    outs = []
    for i, workers in enumerate(("1", "2")):
        out = str(tmp_path / f"out{i}")
        assert main(["build", "--tokenizer", tokenizer_dir, "--out", out, "--resolution", "32", "--seq-length", "64",
                     "--quiet", "--workers", workers, "--und-wds", str(tmp_path / "bad.tar")]) == 3
        outs.append(open(os.path.join(out, "rejects.jsonl"), "rb").read())
    assert outs[0] == outs[1] and b" at 0x" not in outs[0] and outs[0].count(b"\n") == 3


def test_inspect_works_from_any_folder(small, tokenizer_dir, tmp_path, monkeypatch):
    here = tmp_path / "a"
    here.mkdir()
    shutil.copytree(tokenizer_dir, here / "tok")
    monkeypatch.chdir(here)
    assert main(tiny_build_args(small, "tok", "out")) == 0
    monkeypatch.chdir(tmp_path)
    paths = inspect(str(here / "out"), "und", 0, str(tmp_path / "look"))
    assert paths and os.path.exists(paths[0])
