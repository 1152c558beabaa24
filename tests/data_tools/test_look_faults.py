"""`stats`, `inspect` and `verify` on builds that are damaged, unfinished or no build at all: one
`error: ...` line naming the file, key or option (exit status 2), never a traceback; `verify` lists
every problem and goes on; every --help shows its defaults."""

import argparse
import json
import os
import shutil

import pytest

from data_tools.cli import build_parser, main


@pytest.fixture
def build(built, tmp_path):
    """A copy of the session's finished build, free to damage: (root, manifest)."""
    root = str(tmp_path / "build")
    shutil.copytree(built[0], root)
    with open(os.path.join(root, "manifest.json")) as f:
        return root, json.load(f)


def _write_manifest(root, manifest):
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f)


def _error(capsys):
    """The single stderr line of a refusal, without its 'error: ' prefix; nothing on stdout."""
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert out == ""
    return err[len("error: "):-1]


def _verify(root, capsys):
    rc = main(["verify", root, "--no-decode"])
    out, err = capsys.readouterr()
    assert err == ""
    return rc, out.splitlines()


def _hint(root):
    return f"`python -m data_tools verify {root}` lists every problem"


def _shard(root, manifest, task="und"):
    rel = manifest["tasks"][task]["shards"][0]["path"]
    return rel, os.path.join(root, rel)


# --- stats on a damaged build: refused, naming the file and pointing to verify ----------------------


def test_stats_refuses_a_cut_empty_missing_or_folder_shard_naming_it(build, capsys):
    root, manifest = build
    rel, path = _shard(root, manifest)
    size = manifest["tasks"]["und"]["shards"][0]["bytes"]
    data = open(path, "rb").read()
    old_hint = f"`python -m data_tools verify {root}` lists what is wrong; rebuild the shards"
    for damage, says in (
        (lambda: open(path, "wb").write(data[:500]), f"500 bytes, the manifest says {size} (cut short or replaced)"),
        (lambda: open(path, "wb").write(b""), f"0 bytes, the manifest says {size} (cut short or replaced)"),
        (lambda: os.remove(path), "listed in the manifest but no such file or directory"),
        (lambda: os.mkdir(path), "not a file"),
    ):
        damage()
        assert main(["stats", root]) == 2
        assert _error(capsys) == f"{path}: {says}; {old_hint}"
    os.rmdir(path)
    open(path, "wb").write(data)
    assert main(["stats", root]) == 0


def test_stats_refuses_flipped_bytes_and_a_swapped_shard(build, capsys):
    root, manifest = build
    rel, path = _shard(root, manifest)
    good = open(path, "rb").read()
    bad = bytearray(good)
    bad[-12] ^= 0xFF  # in the Arrow footer: same size, unreadable
    open(path, "wb").write(bytes(bad))
    assert main(["stats", root]) == 2
    line = _error(capsys)
    assert line.startswith(f"{path}: not a readable shard (") and line.endswith(f"rebuild the shards ({_hint(root)})")
    bad = bytearray(good)
    bad[-100] ^= 0xFF  # in the schema: a column name is no longer UTF-8
    open(path, "wb").write(bytes(bad))
    assert main(["stats", root]) == 2
    line = _error(capsys)
    assert line.startswith(f"{path}: not a readable shard (UnicodeDecodeError: ") and line.endswith(
        f"rebuild the shards ({_hint(root)})"), line
    rc, lines = _verify(root, capsys)
    assert rc == 1 and any(x.startswith(f"{rel}: unreadable: {path}: not a readable shard (UnicodeDecodeError: ")
                           for x in lines), lines
    # another shard of the same build (same layout) in its place, the manifest's byte count edited to match
    _, text = _shard(root, manifest, "text")
    entry = manifest["tasks"]["und"]["shards"][0]
    n = manifest["tasks"]["text"]["shards"][0]["rows"]
    assert n != entry["rows"]
    shutil.copy(text, path)
    entry["bytes"] = os.path.getsize(path)
    _write_manifest(root, manifest)
    assert main(["stats", root]) == 2
    assert _error(capsys) == (f"{path}: {n} rows, the manifest says {entry['rows']} (a shard of another "
                              f"build?); rebuild the shards ({_hint(root)})")


def test_stats_refuses_damaged_manifest_numbers_naming_the_key(build, capsys):
    root, manifest = build
    manifest["tasks"]["und"]["sequences"] = -1
    manifest["totals"]["records_in"] = "many"
    _write_manifest(root, manifest)
    assert main(["stats", root]) == 2
    assert _error(capsys) == (f"{root}/manifest.json: totals.records_in is 'many'; tasks.und.sequences is -1 "
                              f"(counts must be whole numbers >= 0): the manifest is damaged; {_hint(root)}")
    with pytest.raises(SystemExit) as e:
        main(["stats", root, "--bins", "0"])
    assert e.value.code == 2 and "argument --bins: 0 must be at least 1" in capsys.readouterr().err


# --- roots that are no (finished) build: the same line from all three -----------------------------


def test_a_root_that_is_no_build_is_one_line_for_every_tool(build, corpus, tmp_path, capsys):
    root, _ = build
    empty = tmp_path / "empty"
    empty.mkdir()
    afile = tmp_path / "afile"
    afile.write_text("x")
    raw = os.path.dirname(corpus["text_jsonl"])
    running = tmp_path / "running"  # what an unfinished build leaves: .work and some shards, no manifest
    running.mkdir()
    (running / ".work" / "docs").mkdir(parents=True)
    shutil.copytree(os.path.join(root, "und"), running / "und")
    finished = "give the --out folder of a finished `python -m data_tools build`"
    cases = [
        (str(tmp_path / "nope"), f"{tmp_path}/nope: no such folder; give the --out folder of a `python -m "
                                 "data_tools build`"),
        (str(afile), f"{afile}: a file, not a build folder; give the --out folder of a `python -m data_tools build`"),
        (str(empty), f"{empty}/manifest.json not found: {empty} is not the output root of a build; {finished}"),
        (raw, f"{raw}/manifest.json not found: {raw} is not the output root of a build; {finished}"),
        (str(running), f"{running}/manifest.json not found: the build in {running} is still running or was "
                       "interrupted (its .work folder is there); wait for it to finish, or re-run the same build "
                       "command to resume it"),
    ]
    for where, line in cases:
        for args in (["stats", where], ["verify", where], ["inspect", where, "--out", str(tmp_path / "look")]):
            assert main(args) == 2, args
            assert _error(capsys) == line, args
    assert not os.path.exists(tmp_path / "look")


@pytest.mark.parametrize("text, says", [
    ("{not json", "not JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1)); the "
                  "manifest is damaged: rebuild the shards"),
    ("", "not JSON (Expecting value: line 1 column 1 (char 0)); the manifest is damaged: rebuild the shards"),
    ("[1, 2]", "not a manifest (a JSON list); rebuild the shards"),
])
def test_an_unreadable_manifest_is_one_line_for_every_tool(build, tmp_path, capsys, text, says):
    root, _ = build
    with open(os.path.join(root, "manifest.json"), "w") as f:
        f.write(text)
    for args in (["stats", root], ["verify", root], ["inspect", root, "--out", str(tmp_path / "look")]):
        assert main(args) == 2, args
        assert _error(capsys) == f"{root}/manifest.json: {says}", args


def test_a_hand_edited_manifest_is_refused_naming_the_key(build, tmp_path, capsys):
    root, manifest = build
    edits = [
        (lambda m: m["tasks"]["und"]["shards"][0].__setitem__("rows", -5),
         "tasks.und.shards[0].rows must be a whole number >= 0, got -5; rebuild the shards"),
        (lambda m: m["tasks"]["und"]["shards"][0].__setitem__("path", 7),
         "tasks.und.shards[0].path must be a file name, got 7; rebuild the shards"),
        (lambda m: m["tasks"]["und"]["shards"][0].__setitem__("path", "../x/und/shard-00000.arrow"),
         f"tasks.und.shards[0].path '../x/und/shard-00000.arrow' is outside {root}; a build lists only its own "
         "shards: rebuild the shards"),
        (lambda m: m.pop("tasks"), "'tasks' must map und, gen, text to their shards, got NoneType; rebuild the shards"),
        (lambda m: m["layout"].__setitem__("seq_length", "big"),
         "layout unreadable (invalid literal for int() with base 10: 'big'); rebuild the shards"),
        (lambda m: m["layout"].pop("resolution"), "layout unreadable (no 'resolution'); rebuild the shards"),
    ]
    for edit, says in edits:
        m = json.loads(json.dumps(manifest))
        edit(m)
        _write_manifest(root, m)
        for args in (["stats", root], ["inspect", root, "--out", str(tmp_path / "look")]):
            assert main(args) == 2, (args, says)
            assert _error(capsys) == f"{root}/manifest.json: {says}", args
        rc, lines = _verify(root, capsys)
        assert rc == 1 and lines[-1].endswith("problem(s)"), lines


# --- verify: every problem, never a traceback --------------------------------------------------


def test_verify_lists_every_problem_and_goes_on(build, capsys):
    root, manifest = build
    und_rel, und = _shard(root, manifest)
    gen_rel, gen = _shard(root, manifest, "gen")
    os.remove(os.path.join(root, "rejects.jsonl"))
    os.remove(und)
    os.mkdir(und)  # a folder where a shard was
    with open(gen, "r+b") as f:
        f.truncate(100)
    manifest.pop("format")
    manifest["tasks"]["text"]["sequences"] = -3
    manifest["tasks"]["text"]["shards"][0].pop("sha256")
    manifest["tasks"]["video"] = {"shards": []}
    manifest["inputs"] = None
    _write_manifest(root, manifest)
    rc, lines = _verify(root, capsys)
    assert rc == 1
    for line in (
        "manifest.json: format None, not 'janusflow-packed/1' (the trainer refuses it)",
        "manifest.json: inputs is NoneType, not a list",
        "rejects.jsonl: no such file or directory",
        f"{und_rel}: not a file",
        "manifest.json: tasks.text.shards[0].sha256 must be a hex string, got None",
        "manifest.json: tasks.video: not a task (und, gen, text); the trainer refuses the manifest",
    ):
        assert line in lines, (line, lines)
    assert any(x.startswith(f"{gen_rel}: checksum mismatch (100 bytes, manifest says ") for x in lines), lines
    assert any(x.startswith(f"{gen_rel}: unreadable: ") for x in lines), lines
    assert lines[-1] == f"{len(lines) - 1} problem(s)"


def test_verify_flags_counts_the_shards_do_not_hold_and_a_shard_of_another_layout(build, tmp_path, capsys):
    root, manifest = build
    manifest["tasks"]["und"]["sequences"] += 5
    manifest["totals"]["sequences"] += 5
    _write_manifest(root, manifest)
    rc, lines = _verify(root, capsys)
    n = manifest["tasks"]["und"]["sequences"]
    assert rc == 1 and lines == [f"manifest.json: tasks.und.sequences is {n}, its shards hold {n - 5}", "1 problem(s)"]
    # a shard of a build with another layout: one line saying so, not one per row
    manifest["tasks"]["und"]["sequences"] -= 5
    manifest["totals"]["sequences"] -= 5
    manifest["layout"]["resolution"] = 64
    _write_manifest(root, manifest)
    rc, lines = _verify(root, capsys)
    shards = [s["path"] for t in manifest["tasks"].values() for s in t["shards"]]
    assert rc == 1 and lines == [f"{s}: written for another layout than the manifest's (a shard of another build?)"
                                 for s in shards] + [f"{len(shards)} problem(s)"]


# --- inspect: index, task, --out, tokenizer ---------------------------------------------------------


def test_inspect_index_out_of_range_or_negative(built, tmp_path, capsys):
    root, manifest = built
    n = manifest["tasks"]["und"]["sequences"]
    look = str(tmp_path / "look")
    for index in ("100000", str(n)):
        assert main(["inspect", root, "--out", look, "--index", index]) == 2
        assert _error(capsys) == f"--index {index}: the build has {n} und sequences, 0 to {n - 1}"
    assert not os.path.exists(look)
    with pytest.raises(SystemExit) as e:
        main(["inspect", root, "--out", look, "--index", "-1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.endswith("error: argument --index: -1 must be 0 or more (the first sequence is 0)\n")


def test_inspect_a_task_without_sequences(build, tmp_path, capsys):
    root, manifest = build
    manifest["tasks"]["gen"]["shards"] = []
    manifest["tasks"].pop("text")
    _write_manifest(root, manifest)
    for task in ("gen", "text"):
        assert main(["inspect", root, "--out", str(tmp_path / "look"), "--task", task]) == 2
        assert _error(capsys) == f"the build in {root} has no {task} sequences; --task und"


def test_inspect_out_that_is_a_file_or_holds_an_earlier_inspect(built, tmp_path, capsys):
    root, manifest = built
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert main(["inspect", root, "--out", str(blocker)]) == 2
    assert _error(capsys) == f"--out {blocker}: a file, not a folder; give a folder for sequence.txt and the PNG files"
    look = tmp_path / "look"
    look.mkdir()
    for name in ("und-00.png", "und-07.png", "gen-03.png", "gen-01-codes.npy", "gen-12-latent.npy", "sequence.txt"):
        (look / name).write_bytes(b"stale")
    (look / "notes.txt").write_text("mine")
    (look / "und-1.png").write_text("not inspect's name")
    assert main(["inspect", root, "--out", str(look), "--task", "text"]) == 0
    written = capsys.readouterr().out.split()
    assert written == [str(look / "sequence.txt")]
    assert sorted(os.listdir(look)) == ["notes.txt", "sequence.txt", "und-1.png"]


def test_inspect_with_a_missing_or_foreign_tokenizer(build, tmp_path, capsys):
    from data_tools.tokenizer import DEMO_TEXTS, build_small_tokenizer

    root, manifest = build
    look = str(tmp_path / "look")
    assert main(["inspect", root, "--out", look, "--tokenizer", str(tmp_path / "none")]) == 2
    assert _error(capsys) == (f"--tokenizer: tokenizer path '{tmp_path}/none' is not a local directory (hub ids are "
                              "not loaded at run time); give --tokenizer the folder of the tokenizer the build used")
    manifest["config"]["tokenizer"] = str(tmp_path / "moved")
    _write_manifest(root, manifest)
    assert main(["inspect", root, "--out", look]) == 2
    assert _error(capsys) == (f"the build's tokenizer (config.tokenizer of {root}/manifest.json): tokenizer path "
                              f"'{tmp_path}/moved' is not a local directory (hub ids are not loaded at run time); "
                              "give --tokenizer the folder of the tokenizer the build used")
    from datacontract.tokenizer import load_tokenizer

    small = build_small_tokenizer(str(tmp_path / "small"), DEMO_TEXTS, 260)
    size = len(load_tokenizer(small))  # the vocabulary and the special tokens
    assert main(["inspect", root, "--out", look, "--tokenizer", small]) == 2
    line = _error(capsys)
    assert line.startswith(f"--tokenizer {small} is not the tokenizer of this build (the sequence uses token ")
    assert line.endswith(f", it has {size} tokens); give --tokenizer the folder of the tokenizer the build used")
    assert not os.path.exists(look)


def test_inspect_refuses_a_foreign_tokenizer_of_the_same_size_and_special_ids(build, tokenizer_dir, tmp_path,
                                                                              capsys):
    """Such a tokenizer passed every check and decoded garbage without a word; the manifest records
    the build's tokenizer files, so it is refused naming the file that differs."""
    from datacontract.tokenizer import load_tokenizer, resolve_token_spec
    from tests.data_fixtures import foreign_tokenizer

    root, manifest = build
    look = str(tmp_path / "look")
    foreign = foreign_tokenizer(tokenizer_dir, str(tmp_path / "foreign"))
    own, other = load_tokenizer(tokenizer_dir), load_tokenizer(foreign)
    assert len(other) == len(own) and resolve_token_spec(other) == resolve_token_spec(own)
    assert main(["inspect", root, "--out", look, "--tokenizer", foreign]) == 2
    assert _error(capsys) == (f"--tokenizer {foreign} is not the tokenizer of this build (its files differ "
                              "from the build's: tokenizer.json content changed); give --tokenizer the folder of the "
                              "tokenizer the build used")
    assert not os.path.exists(look)
    # The build's own path, its files replaced since: refused alike.
    manifest["config"]["tokenizer"] = foreign
    _write_manifest(root, manifest)
    assert main(["inspect", root, "--out", look]) == 2
    assert _error(capsys) == (f"the build's tokenizer (config.tokenizer of {root}/manifest.json) {foreign} is not the "
                              "tokenizer of this build (its files differ from the build's: tokenizer.json content changed); give "
                              "--tokenizer the folder of the tokenizer the build used")
    # The same files elsewhere are the build's tokenizer.
    copy = shutil.copytree(tokenizer_dir, str(tmp_path / "copy"), copy_function=shutil.copyfile)
    assert main(["inspect", root, "--out", look, "--tokenizer", copy]) == 0


# --- help ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["stats", "inspect", "verify"])
def test_look_help_shows_every_default_and_explains_root(command):
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    text = parser.format_help()
    assert "output root of a finished build" in text
    for action in parser._actions:
        if action.dest == "help" or action.help == argparse.SUPPRESS:
            continue
        assert action.help, action.dest
        if action.required or not action.option_strings or action.default in (None, False):
            continue
        flag = action.option_strings[-1]
        section = text.split("options:", 1)[1].split("\n  " + flag, 1)[1].split("\n  -", 1)[0]
        assert f"(default: {action.default})" in " ".join(section.split()), (flag, section)


def test_stats_into_a_reader_that_stops_early_is_quiet(built):
    # Before: `stats ROOT | head -1` ended with a BrokenPipeError traceback from the lines head never read.
    import subprocess
    import sys

    from tests.launch_helpers import REPO, child_env

    done = subprocess.run(f"{sys.executable} -m data_tools stats {built[0]} | head -1", shell=True, cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=120)
    assert done.stdout.count("\n") == 1 and done.stderr == "", done.stderr[-2000:]


def test_inspect_refuses_a_latent_of_the_wrong_size_before_touching_out(built, tmp_path, capsys, monkeypatch):
    # Before: a ValueError traceback from decode_latent, after --out's earlier files were removed.
    import dataclasses

    from data_tools import views
    from datacontract.format import COL_GEN_LATENT_DTYPE, COL_GEN_LATENTS

    root, _ = built
    real_find_row, real_layout = views._find_row, views._layout

    def row_with_a_short_latent(root, manifest, _layout, task, index):
        row = dict(real_find_row(root, manifest, real_layout(root, manifest), task, index))
        row[COL_GEN_LATENTS], row[COL_GEN_LATENT_DTYPE] = [b"\0" * 6], "float16"  # 3 values, not the layout's
        return row

    monkeypatch.setattr(views, "_find_row", row_with_a_short_latent)
    monkeypatch.setattr(views, "_layout", lambda *args: dataclasses.replace(real_layout(*args), latent_shape=(4, 2, 2)))
    look = tmp_path / "look"
    look.mkdir()
    (look / "sequence.txt").write_text("an earlier inspect")
    assert main(["inspect", root, "--task", "gen", "--out", str(look)]) == 2
    assert _error(capsys) == (f"gen sequence 0: {COL_GEN_LATENTS}[0] does not decode (latent has 3 values, shape "
                              f"(4, 2, 2) needs 16); {_hint(root)}")
    assert (look / "sequence.txt").read_text() == "an earlier inspect"
