"""Class-labelled images (a class_name/*.jpg tree, tars with a class field) become generation documents
whose prompt is the class name; bad files and unknown classes are rejected with a reason, never a crash."""

import json
import os

import numpy as np
import pytest

from data_tools.cli import main
from data_tools.synthetic import encode, make_image, write_tar
from datacontract.format import Task, TokenKind
from datacontract.shards import ShardReader, read_manifest


def _jpg(seed):
    return encode(make_image(40, 30, seed))


def _prompts(out, tokenizer):
    """{document key: prompt text} of every generation document in the build."""
    m = read_manifest(out)
    found = {}
    for entry in m["tasks"].values():
        for shard in entry["shards"]:
            reader = ShardReader(os.path.join(out, shard["path"]))
            for i in range(reader.num_rows):
                row = reader.read_row(i)
                ids, kinds, start = np.asarray(row["input_ids"]), np.asarray(row["token_kind"]), 0
                for n, task, key in zip(row["doc_lengths"], row["doc_tasks"], row["doc_keys"]):
                    if task == Task.GENERATION:
                        image = start + int(np.flatnonzero((kinds[start:start + n] == TokenKind.GEN_TIME)
                                                           | (kinds[start:start + n] == TokenKind.GEN_CODE))[0])
                        stop = image if kinds[image] == TokenKind.GEN_TIME else image - 1  # Janus-Pro: <boi> first
                        found[key] = tokenizer.decode(ids[start + 1:stop].tolist())
                    start += n
    return found


def _build(tok, out, *inputs):
    return main(["build", "--tokenizer", tok, "--out", out, "--resolution", "32", "--seq-length", "256",
                 "--workers", "1", "--quiet", *inputs])


def _rejects(out):
    with open(os.path.join(out, "rejects.jsonl"), encoding="utf-8") as f:
        return {r["key"]: r["reason"] for r in map(json.loads, f)}


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "imagenet"
    for rel, data in [("golden_retriever/a.jpg", _jpg(0)), ("golden_retriever/b.JPEG", _jpg(1)),
                      ("tabby_cat/sub/c.png", encode(make_image(30, 30, 2), "PNG")), ("stray.jpg", _jpg(3)),
                      ("tabby_cat/notes.txt", b"not an image"), ("tabby_cat/broken.jpg", b"\xff\xd8garbage"),
                      ("___/d.jpg", _jpg(4))]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    os.symlink("/etc/passwd", root / "tabby_cat" / "link.jpg")
    bad = os.fsencode(str(root)) + b"/caf\xe9_cat"  # a folder name that is not UTF-8
    os.makedirs(bad)
    with open(bad + b"/e.jpg", "wb") as f:
        f.write(_jpg(5))
    return root


def test_class_folder_tree(tree, tokenizer_dir, tokenizer, tmp_path):
    out = str(tmp_path / "out")
    assert _build(tokenizer_dir, out, "--gen-class-folder", str(tree)) == 0
    prompts = _prompts(out, tokenizer)
    assert prompts == {"imagenet:golden_retriever/a.jpg": "User: golden retriever\n\nAssistant:",
                       "imagenet:golden_retriever/b.JPEG": "User: golden retriever\n\nAssistant:",
                       "imagenet:tabby_cat/sub/c.png": "User: tabby cat\n\nAssistant:"}
    rejects = _rejects(out)
    assert rejects.pop("stray.jpg") == "missing_class"
    assert rejects.pop("tabby_cat/notes.txt") == "unsupported_member"
    assert rejects.pop("tabby_cat/broken.jpg") == "corrupt_image"
    assert rejects.pop("tabby_cat/link.jpg") == "link_member"
    assert rejects.pop("___/d.jpg") == "empty_caption"
    assert list(rejects.values()) == ["invalid_unicode"]  # the non-UTF-8 class folder
    entry = read_manifest(out)["inputs"][0]
    assert entry["format"] == "classdir" and entry["task"] == "gen"
    assert entry["records_in"] == 9 == entry["records_written"] + entry["records_rejected"]


def test_class_names_map_and_unknown_classes(tree, tokenizer_dir, tokenizer, tmp_path, capsys):
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"golden_retriever": "golden retriever dog", "tabby_cat": "tabby, tabby cat"}))
    out = str(tmp_path / "out")
    assert _build(tokenizer_dir, out, "--gen-class-folder", str(tree), "--class-names", str(names)) == 0
    assert set(_prompts(out, tokenizer).values()) == {"User: golden retriever dog\n\nAssistant:",
                                                      "User: tabby, tabby cat\n\nAssistant:"}
    assert _rejects(out)["___/d.jpg"] == "unknown_class"
    names.write_text("[1, 2]")
    capsys.readouterr()
    assert _build(tokenizer_dir, str(tmp_path / "o2"), "--gen-class-folder", str(tree), "--class-names", str(names)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--class-names" in err


def test_a_changed_folder_is_refused_on_rerun(tree, tokenizer_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert _build(tokenizer_dir, out, "--gen-class-folder", str(tree)) == 0
    (tree / "tabby_cat" / "new.jpg").write_bytes(_jpg(9))
    capsys.readouterr()
    assert _build(tokenizer_dir, out, "--gen-class-folder", str(tree)) == 2
    err = capsys.readouterr().err
    assert "imagenet" in err and "--overwrite" in err
    assert _build(tokenizer_dir, str(tmp_path / "o2"), "--gen-class-folder", str(tree / "stray.jpg")) == 2
    assert "not a folder" in capsys.readouterr().err


def test_class_tars(tokenizer_dir, tokenizer, tmp_path):
    tar = write_tar(str(tmp_path / "in-000.tar"), [
        ("k0.jpg", _jpg(0)), ("k0.cls", b"0"),
        ("k1.jpg", _jpg(1)), ("k1.json", json.dumps({"label": 1}).encode()),
        ("k2.jpg", _jpg(2)), ("k2.cls", b"7"),  # no such class
        ("k3.jpg", _jpg(3)), ("k3.txt", b"a caption, no class"),
        ("k4.jpg", b"\xff\xd8garbage"), ("k4.cls", b"0"),
        ("k5.jpg", _jpg(5)), ("k5.cls", b"\xff\xfe"),
        ("k6.jpg", _jpg(6)), ("k6.json", b"{not json"),
    ])
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["tench", "goldfish"]))
    out = str(tmp_path / "out")
    assert _build(tokenizer_dir, out, "--gen-class-wds", tar, "--class-names", str(names)) == 0
    assert _prompts(out, tokenizer) == {"in-000.tar:k0": "User: tench\n\nAssistant:",
                                        "in-000.tar:k1": "User: goldfish\n\nAssistant:"}
    assert _rejects(out) == {"k2": "unknown_class", "k3": "missing_class", "k4": "corrupt_image",
                             "k5": "caption_not_utf8", "k6": "malformed_json"}
    # Without a map, a class id has no name; a class given as a name is its own prompt.
    tar2 = write_tar(str(tmp_path / "in-001.tar"), [("a.jpg", _jpg(0)), ("a.cls", b"3"),
                                                     ("b.jpg", _jpg(1)), ("b.cls", b"sea_lion")])
    out2 = str(tmp_path / "out2")
    assert _build(tokenizer_dir, out2, "--gen-class-wds", tar2) == 0
    assert _rejects(out2) == {"a": "unknown_class"}
    assert list(_prompts(out2, tokenizer).values()) == ["User: sea lion\n\nAssistant:"]


def test_class_folder_as_januspro_codes(tree, tokenizer_dir, tokenizer, tmp_path):
    import torch

    from image_codecs.kmeans import KMeansPatchCodec

    KMeansPatchCodec(torch.rand(8, 8 * 8 * 3) * 2 - 1, 8).save(str(tmp_path / "codec"))
    out = str(tmp_path / "out")
    assert _build(tokenizer_dir, out, "--gen-class-folder", str(tree), "--family", "januspro", "--codec",
                  "kmeans_patches", "--codec-path", str(tmp_path / "codec")) == 0
    assert sorted(_prompts(out, tokenizer).values()) == ["User: golden retriever\n\nAssistant:"] * 2 + [
        "User: tabby cat\n\nAssistant:"]


@pytest.mark.timeout(30)  # the old reader opened the pipe and waited for a writer forever
def test_a_pipe_in_a_class_folder_is_rejected_not_waited_on(tmp_path, tokenizer_dir):
    root = tmp_path / "classes"
    (root / "tench").mkdir(parents=True)
    (root / "tench" / "a.jpg").write_bytes(_jpg(0))
    os.mkfifo(root / "tench" / "b.jpg")
    out = str(tmp_path / "out")
    assert _build(tokenizer_dir, out, "--gen-class-folder", str(root)) == 0
    assert _rejects(out) == {"tench/b.jpg": "unsupported_member"}
    assert read_manifest(out)["inputs"][0]["records_written"] == 1


def test_a_class_folder_that_cannot_be_listed_is_a_reject_not_a_silent_gap(tmp_path, monkeypatch):
    """os.walk skips a folder it cannot list without a word (root can read everything, so the
    permission error is simulated): its files would be missing from the build uncounted."""
    from data_tools.class_sources import folder_files, read_class_folder
    from data_tools.records import Chunk, ReaderOptions

    root = tmp_path / "classes"
    for rel in ("tench/a.jpg", "goldfish/locked/b.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_jpg(0))
    locked = str(root / "goldfish" / "locked")
    real_scandir, real_listdir = os.scandir, os.listdir

    def refuse(real):
        def listing(path="."):
            if os.fspath(path) == locked:
                raise PermissionError(13, "Permission denied", locked)
            return real(path)
        return listing

    monkeypatch.setattr(os, "scandir", refuse(real_scandir))
    monkeypatch.setattr(os, "listdir", refuse(real_listdir))
    folder_files.cache_clear()
    try:
        files = folder_files(str(root))
        records = list(read_class_folder(Chunk(0, "classdir", Task.GENERATION, str(root), 0, len(files)),
                                         ReaderOptions()))
    finally:
        folder_files.cache_clear()
    rejects = {r.key: (r.reason, r.detail) for r in records if hasattr(r, "reason")}
    assert [r.key for r in records if not hasattr(r, "reason")] == ["tench/a.jpg"]
    assert rejects["goldfish/locked"][0] == "unreadable_file" and "Permission denied" in rejects["goldfish/locked"][1]


CLASS_NAME_FILES = [("empty", b"", "the file is empty"),
                    ("a key twice", b'{"tench": "tench", "tench": "a fish"}', "class 'tench' is given twice"),
                    ("empty object", b"{}", "names no class"),
                    ("empty list", b"[]", "names no class"),
                    ("nested deeply", b"[" * 100000, "nested too deeply"),
                    ("a null name", b'["tench", null]', "class '1': the name must be a string, got null")]


@pytest.mark.parametrize("contents,message", [c[1:] for c in CLASS_NAME_FILES], ids=[c[0] for c in CLASS_NAME_FILES])
def test_a_bad_class_names_file_is_one_line_before_the_build(tree, tokenizer_dir, tmp_path, capsys, contents, message):
    """Before: a deep nesting was a RecursionError traceback, a repeated key silently took the last
    name, and an empty map rejected every record only once the whole input had been read."""
    names = tmp_path / "names.json"
    names.write_bytes(contents)
    out = tmp_path / "out"
    assert _build(tokenizer_dir, str(out), "--gen-class-folder", str(tree), "--class-names", str(names)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --class-names {names}: ") and message in err
    assert not (out / "manifest.json").exists()


def test_a_json_class_field_of_the_wrong_type_is_named_not_called_missing(tokenizer_dir, tmp_path):
    tar = write_tar(str(tmp_path / "in-000.tar"), [
        ("k0.jpg", _jpg(0)), ("k0.json", json.dumps({"label": 1}).encode()),
        ("k1.jpg", _jpg(1)), ("k1.json", json.dumps({"label": 1.0}).encode()),
        ("k2.jpg", _jpg(2)), ("k2.json", json.dumps({"label": ["goldfish"]}).encode()),
        ("k3.jpg", _jpg(3)), ("k3.json", json.dumps({"label": None}).encode()),
    ])
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["tench", "goldfish"]))
    out = str(tmp_path / "out")
    assert _build(tokenizer_dir, out, "--gen-class-wds", tar, "--class-names", str(names)) == 0
    with open(os.path.join(out, "rejects.jsonl"), encoding="utf-8") as f:
        rejects = {r["key"]: (r["reason"], r["detail"]) for r in map(json.loads, f)}
    assert rejects["k1"] == ("unknown_class", "json field 'label' is 1.0 (float): expected a class name or a "
                                              "whole-number class id")
    assert rejects["k2"] == ("unknown_class", 'json field \'label\' is ["goldfish"] (list): expected a class name '
                                              "or a whole-number class id")
    assert rejects["k3"][0] == "missing_class"  # null is as good as absent
    assert set(rejects) == {"k1", "k2", "k3"}
