"""Every kind of bad input is rejected with its source, key and reason; nothing is lost silently."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from data_tools.cli import main
from data_tools.synthetic import encode, make_image, write_jsonl, write_parquet, write_tar
from datacontract.shards import read_manifest
from data_tools.verify import verify


def _png(img):
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def dirty(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("dirty")
    good = encode(make_image(60, 40, 1))
    expect = {}  # (file name, key) -> reason; None = accepted

    def rec(name, key, reason):
        expect[(name, key)] = reason

    members = [("ok.jpg", good), ("ok.txt", b"a good caption")]
    rec("dirty.tar", "ok", None)
    cases = {
        "corrupt": ([("corrupt.jpg", b"\xff\xd8garbage" * 10), ("corrupt.txt", b"x")], "corrupt_image"),
        "zero": ([("zero.jpg", b""), ("zero.txt", b"x")], "empty_file"),
        "trunc": ([("trunc.jpg", good[: len(good) // 2]), ("trunc.txt", b"x")], "corrupt_image"),
        "cmyk": ([("cmyk.jpg", encode(make_image(50, 50, 2).convert("CMYK"))), ("cmyk.txt", b"cmyk ok")], None),
        "deep": ([("deep.png", _png(Image.fromarray(np.full((30, 40), 40000, np.uint16)))), ("deep.txt", b"16 bit")], None),
        "pal": ([("pal.png", _png(make_image(40, 40, 3).convert("P"))), ("pal.txt", b"palette")], None),
        "alpha": ([("alpha.png", _png(make_image(40, 40, 4).convert("RGBA"))), ("alpha.txt", b"alpha")], None),
        "bomb": ([("bomb.png", _png(Image.new("L", (2000, 2000)))), ("bomb.txt", b"x")], "decompression_bomb"),
        "nocap": ([("nocap.jpg", good)], "missing_caption"),
        "emptycap": ([("emptycap.jpg", good), ("emptycap.txt", b"  \n")], "empty_caption"),
        "latin1": ([("latin1.jpg", good), ("latin1.txt", "caf\xe9".encode("latin-1"))], "caption_not_utf8"),
        "badjson": ([("badjson.jpg", good), ("badjson.json", b"{not json")], "malformed_json"),
        "../evil": ([("../evil.jpg", good), ("../evil.txt", b"x")], "unsafe_path"),
        "noimg": ([("noimg.txt", b"only text")], "missing_image"),
    }
    for key, (ms, reason) in cases.items():
        members += ms
        rec("dirty.tar", key, reason)
    write_tar(str(root / "dirty.tar"), members)

    # A tar cut in the middle of its third record's image.
    full = str(root / "full.tar")
    big = encode(make_image(90, 90, 5))
    write_tar(full, [(f"r{i}.jpg", big) for i in range(1)] + [("r0.txt", b"first")]
              + [("r1.jpg", big), ("r1.txt", b"second"), ("r2.jpg", big), ("r2.txt", b"third")])
    data = open(full, "rb").read()
    cut = data.index(b"third") - 600  # inside r2.jpg's data (r2.txt follows it)
    with open(root / "cut.tar", "wb") as f:
        f.write(data[:cut])
    os.remove(full)
    rec("cut.tar", "r0", None)
    rec("cut.tar", "r1", None)
    with open(root / "garbage.tar", "wb") as f:
        f.write(b"this is not a tar file" * 30)

    write_parquet(str(root / "dirty.parquet"), [good, None, good, b"\x00bad", good],
                  ["fine", "no image", b"\xff\xfe", "bad image", None])
    for i, reason in enumerate([None, "missing_image", "caption_not_utf8", "corrupt_image", "missing_caption"]):
        rec("dirty.parquet", f"row{i}", reason)

    lines = ['{"text": "a fine document"}', '{"text": broken', "", '{"other": 1}', '{"text": "   "}']
    write_jsonl(str(root / "dirty.jsonl"), lines)
    with open(root / "dirty.jsonl", "ab") as f:
        f.write(b'{"text": "caf\xe9"}\n')
    for lineno, reason in [(1, None), (2, "malformed_json"), (4, "missing_text"), (5, "empty_text"), (6, "not_utf8")]:
        rec("dirty.jsonl", f"line{lineno}", reason)

    imgs = root / "imgs"
    imgs.mkdir()
    (imgs / "a.jpg").write_bytes(good)
    q, a = {"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "this"}
    items = [
        {"id": "ok", "image": "a.jpg", "conversations": [q, a]},
        {"id": "two_markers", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image><image>"}, a]},
        {"id": "no_marker", "image": "a.jpg", "conversations": [{"from": "human", "value": "what?"}, a]},
        {"id": "missing_file", "image": "nope.jpg", "conversations": [q, a]},
        {"id": "escape", "image": "../a.jpg", "conversations": [q, a]},
        {"id": "order", "image": "a.jpg", "conversations": [a, q]},
        {"id": "unanswered", "image": "a.jpg", "conversations": [q]},
        {"id": "noconv", "image": "a.jpg"},
    ]
    reasons = [None, "image_marker_mismatch", "image_marker_mismatch", "missing_image_file", "unsafe_path",
               "bad_conversation", "bad_conversation", "bad_conversation"]
    with open(root / "conv.json", "w") as f:
        json.dump(items, f)
    for i, (item, reason) in enumerate(zip(items, reasons)):
        rec("conv.json", f"item{i}:{item['id']}", reason)

    out = str(root / "out")
    args = ["build", "--tokenizer", tokenizer_dir, "--out", out, "--resolution", "32", "--seq-length", "256",
            "--workers", "2", "--quiet", "--max-pixels", "1000000",
            "--und-wds", str(root / "dirty.tar"), "--gen-wds", str(root / "cut.tar"),
            "--gen-wds", str(root / "garbage.tar"), "--und-parquet", str(root / "dirty.parquet"),
            "--text-jsonl", str(root / "dirty.jsonl"), "--llava", str(root / "conv.json"),
            "--llava-image-root", str(imgs)]
    assert main(args) == 0
    rejects = [json.loads(x) for x in open(os.path.join(out, "rejects.jsonl"))]
    return out, expect, rejects


def test_each_bad_record_is_rejected_with_its_reason(dirty):
    out, expect, rejects = dirty
    got = {(os.path.basename(r["source"]), r["key"]): r["reason"] for r in rejects}
    for (name, key), reason in expect.items():
        if reason is None:
            assert (name, key) not in got, f"{name}:{key} should be accepted, got {got.get((name, key))}"
        else:
            assert got.get((name, key)) == reason, f"{name}:{key}: expected {reason}, got {got.get((name, key))}"


def test_truncated_and_unreadable_archives_are_reported(dirty):
    out, _, rejects = dirty
    cut = [r for r in rejects if r["source"].endswith("cut.tar")]
    assert cut and all(r["reason"] == "truncated_archive" for r in cut)
    garbage = [r for r in rejects if r["source"].endswith("garbage.tar")]
    assert [(r["key"], r["reason"]) for r in garbage] == [("<unreadable after record 0>", "damaged_archive")]
    assert "660 bytes at offset 0" in garbage[0]["detail"]


def test_records_in_equal_written_plus_rejected_per_file(dirty):
    out, expect, rejects = dirty
    manifest = read_manifest(out)
    by_file = {os.path.basename(e["path"]): e for e in manifest["inputs"]}
    assert set(by_file) == {"dirty.tar", "cut.tar", "garbage.tar", "dirty.parquet", "dirty.jsonl", "conv.json"}
    for name, e in by_file.items():
        assert e["records_in"] == e["records_written"] + e["records_rejected"], name
        assert e["records_rejected"] == sum(1 for r in rejects if os.path.basename(r["source"]) == name)
    for name in ("dirty.tar", "dirty.parquet", "dirty.jsonl", "conv.json"):
        n_expected = sum(1 for (f, _), _r in expect.items() if f == name)
        assert by_file[name]["records_in"] == n_expected, name
        assert by_file[name]["records_written"] == sum(1 for (f, _), r in expect.items() if f == name and r is None)
    assert by_file["cut.tar"]["records_written"] == 2
    assert verify(out) == []
