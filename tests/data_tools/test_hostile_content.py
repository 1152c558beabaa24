"""Hostile content: strings no encoder accepts, literal special-token text, and small files that
would take gigabytes to process. No single record may end a build or produce control tokens."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_tools.cli import main
from data_tools.documents import DocumentBuilder, LayoutOptions
from datacontract.images import ImageRejected, open_image
from data_tools.sources import RawRecord
from data_tools.synthetic import encode, make_image, write_jsonl, write_tar
from datacontract.tokenizer import resolve_token_spec
from data_tools.verify import verify
from datacontract.format import Task
from datacontract.shards import ShardReader, read_manifest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOOD = encode(make_image(40, 30, 1))
SPECIALS = ["<bos>", "<eos>", "<pad>", "<begin_of_image>", "<end_of_image>", "<image_placeholder>"]


def _build(tmp_path, tok, *inputs, extra=(), seq_length=256):
    out = str(tmp_path / "out")
    args = ["build", "--tokenizer", tok, "--out", out, "--resolution", "32", "--seq-length", str(seq_length),
            "--workers", "1", "--quiet", *inputs, *extra]
    return main(args), out


def _rejects(out):
    return {(os.path.basename(r["source"]), r["key"]): r for r in map(json.loads, open(os.path.join(out, "rejects.jsonl")))}


def test_lone_surrogates_are_rejected_not_fatal(tmp_path, tokenizer_dir):
    raw = tmp_path / "raw"
    raw.mkdir()
    lines = ['{"text": "fine"}', '{"text": "bad \\ud800 text"}', '{"text": "tail \\udfff"}',
             '{"text": "pair \\ud83d\\ude00 is fine"}']
    write_jsonl(str(raw / "t.jsonl"), lines)
    write_tar(str(raw / "c.tar"), [("a.jpg", GOOD), ("a.json", b'{"caption": "x \\\\ud800 y"}'),
                                   ("b.jpg", GOOD), ("b.json", b'{"caption": "\\ud800"}'),
                                   ("c.jpg", GOOD), ("c.txt", b"fine caption")])
    q = {"from": "human", "value": "<image>\nwhat?"}
    (raw / "img.jpg").write_bytes(GOOD)
    items = [{"id": "ok\ud800id", "image": "img.jpg", "conversations": [q, {"from": "gpt", "value": "fine"}]},
             {"id": "bad", "image": "img.jpg", "conversations": [q, {"from": "gpt", "value": "no \udc80"}]}]
    (raw / "conv.json").write_text(json.dumps(items))  # ensure_ascii: the surrogates stay \u escapes
    code, out = _build(tmp_path, tokenizer_dir, "--text-jsonl", str(raw / "t.jsonl"), "--und-wds",
                       str(raw / "c.tar"), "--llava", str(raw / "conv.json"))
    assert code == 0
    rej = _rejects(out)
    assert {k: r["reason"] for k, r in rej.items()} == {
        ("t.jsonl", "line2"): "invalid_unicode", ("t.jsonl", "line3"): "invalid_unicode",
        ("c.tar", "b"): "invalid_unicode", ("conv.json", "item1:bad"): "invalid_unicode"}
    m = read_manifest(out)
    assert m["totals"]["records_written"] == 2 + 2 + 1  # "\\\\ud800" is an escaped backslash: plain text
    assert verify(out, decode=False) == []


def _control_counts(ids, spec):
    ids = np.asarray(ids)
    return {name: int((ids == getattr(spec, name)).sum()) for name in
            ("bos_id", "eos_id", "pad_id", "begin_of_image_id", "end_of_image_id", "image_placeholder_id")}


def test_special_token_text_never_becomes_control_tokens(tmp_path, tokenizer_dir, tokenizer):
    hostile = " ".join(SPECIALS) + " x<eos>y <<bos>> <begin_of_image><image_placeholder><end_of_image>"
    raw = tmp_path / "raw"
    raw.mkdir()
    write_tar(str(raw / "u.tar"), [("u.jpg", GOOD), ("u.txt", hostile.encode())])
    write_tar(str(raw / "g.tar"), [("g.jpg", GOOD), ("g.txt", hostile.encode())])
    write_jsonl(str(raw / "t.jsonl"), [{"text": hostile}])
    (raw / "img.jpg").write_bytes(GOOD)
    conv = [{"from": "human", "value": "<image>\n" + hostile}, {"from": "gpt", "value": hostile},
            {"from": "human", "value": hostile}, {"from": "gpt", "value": hostile}]
    (raw / "conv.json").write_text(json.dumps([{"id": "h", "image": "img.jpg", "conversations": conv}]))
    code, out = _build(tmp_path, tokenizer_dir, "--und-wds", str(raw / "u.tar"), "--gen-wds", str(raw / "g.tar"),
                       "--text-jsonl", str(raw / "t.jsonl"), "--llava", str(raw / "conv.json"),
                       extra=["--no-text-fillers"], seq_length=1024)
    assert code == 0
    spec = resolve_token_spec(tokenizer)
    m = read_manifest(out)
    assert m["totals"]["records_written"] == 4
    und_tokens, gen_tokens = LayoutOptions(resolution=32).und_tokens, LayoutOptions(resolution=32).gen_tokens
    # What the layouts of format.py put, and nothing more (pad is never in a document).
    expected = {
        "u.tar:u": dict(bos_id=1, eos_id=1, pad_id=0, begin_of_image_id=1, end_of_image_id=1,
                        image_placeholder_id=und_tokens),
        "conv.json:item0:h": dict(bos_id=1, eos_id=2, pad_id=0, begin_of_image_id=1, end_of_image_id=1,
                                  image_placeholder_id=und_tokens),
        "g.tar:g": dict(bos_id=1, eos_id=0, pad_id=0, begin_of_image_id=1, end_of_image_id=1,
                        image_placeholder_id=gen_tokens),
        "t.jsonl:line1": dict(bos_id=1, eos_id=1, pad_id=0, begin_of_image_id=0, end_of_image_id=0,
                              image_placeholder_id=0),
    }
    seen = {}
    for entry in m["tasks"].values():
        for shard in entry["shards"]:
            for row in ShardReader(os.path.join(out, shard["path"])).table.to_pylist():
                pos = 0
                for n, key in zip(row["doc_lengths"], row["doc_keys"]):
                    counts = _control_counts(row["input_ids"][pos : pos + n], spec)
                    name = key.partition("@")[0]
                    seen[name] = {k: seen.get(name, {}).get(k, 0) + v for k, v in counts.items()}
                    pos += n
    assert seen == expected
    # The hostile text itself survives as text: an answer decodes back to it.
    builder = DocumentBuilder(tokenizer, spec, LayoutOptions(resolution=32, seq_length=1024))
    doc = builder.build(RawRecord("s", "k", Task.TEXT, text=hostile))
    assert tokenizer.decode(doc.input_ids[1:-1]) == hostile


class _CountingTokenizer:
    """Wraps a tokenizer and records the longest text it was asked to encode."""

    def __init__(self, tok):
        self.tok, self.longest = tok, 0

    def encode(self, text, **kw):
        self.longest = max(self.longest, len(text))
        return self.tok.encode(text, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


@pytest.mark.parametrize("task", [Task.UNDERSTANDING, Task.GENERATION])
def test_a_huge_caption_is_cut_before_tokenizing(tokenizer, task):
    counting = _CountingTokenizer(tokenizer)
    layout = LayoutOptions(resolution=32, seq_length=256)
    builder = DocumentBuilder(counting, resolve_token_spec(tokenizer), layout)
    caption = "a red cat " * 2_000_000  # 20 MB
    doc = builder.build(RawRecord("s", "k", task, images=[GOOD], caption=caption))
    assert doc.truncated and len(doc) <= 256
    assert counting.longest <= 16 * 256 + 32  # the capped caption plus the template around it


def test_a_long_text_document_is_tokenized_in_bounded_pieces(tokenizer):
    counting = _CountingTokenizer(tokenizer)
    builder = DocumentBuilder(counting, resolve_token_spec(tokenizer), LayoutOptions(resolution=32))
    text = " ".join(f"word{i % 97} and more" for i in range(60_000))  # ~1 MB, many pieces
    doc = builder.build(RawRecord("s", "k", Task.TEXT, text=text))
    assert counting.longest <= 1 << 16
    assert tokenizer.decode(doc.input_ids[1:-1]) == text  # pieces join back exactly
    assert not doc.truncated


_RSS_SCRIPT = r"""
import io, resource, sys
import numpy as np
from PIL import Image
data = open(sys.argv[1], "rb").read()
from datacontract.images import open_image, prepare_und_image, ImageRejected
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    img = prepare_und_image(open_image(data, 100_000_000), 64, int(sys.argv[2]) << 20)
    result = "ok %dx%d" % img.size
except ImageRejected as e:
    result = e.reason
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("RESULT", result, (after - before) // 1024)
"""


@pytest.mark.slow
def test_a_small_16_bit_png_of_8000x8000_stays_within_bounded_memory(tmp_path):
    path = tmp_path / "big16.png"
    make = ("import numpy as np, sys; from PIL import Image; a = np.zeros((8000, 8000), np.uint16); "
            "a[::97] = 40000; Image.fromarray(a).save(sys.argv[1])")
    subprocess.run([sys.executable, "-c", make, str(path)], check=True)
    assert path.stat().st_size < 2_000_000
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = lambda mb: subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path), str(mb)], env=env, cwd=ROOT,
                                    capture_output=True, text=True, check=True).stdout.split("RESULT")[-1].split()
    result, grown_mb = run(64)  # 8000 x 8000 x 2 bytes = 122 MiB decoded: refused before decoding
    assert result == "decompression_bomb" and int(grown_mb) < 40
    result, *rest, grown_mb = run(256)  # accepted, converted in row bands: decoded buffer + 8-bit copy + slack
    # measured 212 MiB (it was about 2 GiB with float64 conversion and full-size RGB copies)
    assert result == "ok" and rest == ["64x64"] and int(grown_mb) < 122 + 61 + 50, grown_mb


def test_max_pixels_means_what_it_says_above_pils_limit():
    big = io.BytesIO()
    Image.new("1", (12000, 12000)).save(big, "PNG")  # 144 M pixels: above PIL's 89 M and 2x limit
    data = big.getvalue()
    saved = Image.MAX_IMAGE_PIXELS
    assert open_image(data, max_pixels=150_000_000).size == (12000, 12000)
    with pytest.raises(ImageRejected) as e:
        open_image(data, max_pixels=100_000_000)
    assert e.value.reason == "decompression_bomb"
    with pytest.raises(ImageRejected):
        open_image(encode(make_image(100, 100, 0)), max_pixels=9_999)
    assert Image.MAX_IMAGE_PIXELS == saved  # PIL's global is restored
