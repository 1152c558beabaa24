"""``python -m data_tools synth``: determinism, layout, held-out split, tokenizer, and that ``build`` reads it."""

import glob
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_tools.cli import main
from data_tools.synth_shapes import (BACKGROUNDS, PALETTE, POSITIONS, SHAPES, SIZES, TINY_CPU_LAYOUT, Scene, all_texts,
                                     build_command, caption, draw, heldout_combos, is_heldout_combo, synthesize)
from pretrain.picture_measures import dominant_colour

N_TRAIN, N_HELDOUT = 40, 30


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth") / "a")
    assert main(["synth", "--out", out, "--train", str(N_TRAIN), "--heldout", str(N_HELDOUT), "--seed", "3"]) == 0
    return out


def _files(root):
    out = {}
    for path in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def _tar_samples(path):
    """[(key, PIL image, caption)] of a webdataset tar."""
    members = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            members[m.name] = tf.extractfile(m).read()
    keys = sorted({n.split(".")[0] for n in members})
    return [(k, Image.open(io.BytesIO(members[k + ".png"])), members[k + ".txt"].decode()) for k in keys]


def _parse_caption(text):
    words = text.split()
    size, colour, shape = words[1:4]
    position = " ".join(words[6 : words.index("on")])
    return colour, shape, size, position, words[-2]


def test_same_seed_same_bytes_other_seed_differs(synth, tmp_path):
    again = str(tmp_path / "b")
    synthesize(again, N_TRAIN, N_HELDOUT, 32, seed=3)
    a, b = _files(synth), _files(again)
    assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a)
    other = str(tmp_path / "c")
    synthesize(other, N_TRAIN, N_HELDOUT, 32, seed=4, tokenizer=False)
    c = _files(other)
    assert c["train/gen-000.tar"] != a["train/gen-000.tar"] and c["heldout/qa.json"] != a["heldout/qa.json"]
    # an existing output is refused, then replaced whole with --overwrite
    with pytest.raises(SystemExit):
        main(["synth", "--out", other, "--train", "3", "--heldout", "2", "--no-tokenizer"])
    assert main(["synth", "--out", other, "--train", "3", "--heldout", "2", "--no-tokenizer", "--overwrite"]) == 0
    assert sorted(os.listdir(os.path.join(other, "train", "images"))) == ["000000.png", "000001.png", "000002.png"]


def test_layout_and_contents(synth):
    for split, n in (("train", N_TRAIN), ("heldout", N_HELDOUT)):
        root = os.path.join(synth, split)
        for prefix in ("gen", "und"):
            samples = _tar_samples(os.path.join(root, prefix + "-000.tar"))
            assert len(samples) == n
            for _, img, cap in samples:
                assert img.size == (32, 32) and img.mode == "RGB"
                assert cap == caption(Scene(*_parse_caption(cap)))
        with open(os.path.join(root, "qa.json")) as f:
            qa = json.load(f)
        assert len(qa) == n
        for item in qa:
            conv = item["conversations"]
            assert os.path.isfile(os.path.join(root, item["image"]))
            assert conv[0]["from"] == "human" and conv[0]["value"].startswith("<image>\nWhat colour is the ")
            assert conv[1]["from"] == "gpt" and conv[1]["value"] in PALETTE and len(conv) in (2, 4)
        with open(os.path.join(root, "text.jsonl")) as f:
            lines = [json.loads(line) for line in f]
        assert len(lines) == n and all(line["text"].strip() for line in lines)
    with open(os.path.join(synth, "heldout", "eval.json")) as f:
        ev = json.load(f)
    assert ev["palette"] == {k: list(v) for k, v in PALETTE.items()} and ev["chance"] == pytest.approx(1 / 6)
    assert [it["index"] for it in ev["generation"]] == list(range(N_HELDOUT))
    assert [it["index"] for it in ev["qa"]] == list(range(N_HELDOUT))
    for it in ev["qa"]:
        assert it["question"] == f"What colour is the {it['question'].split()[-1][:-1]}?" and it["answer"] in PALETTE


def test_heldout_combinations(synth):
    held = heldout_combos()
    assert 0 < len(held) < len(PALETTE) * len(SHAPES) * len(POSITIONS) / 4
    train_triples = {(c, s, p) for c in PALETTE for s in SHAPES for p in POSITIONS} - set(held)
    # every colour-shape, colour-position and shape-position pair is still seen in training
    for i, j in ((0, 1), (0, 2), (1, 2)):
        pairs = {(t[i], t[j]) for t in train_triples}
        assert len(pairs) == len({(t[i], t[j]) for t in train_triples | set(held)})
    with open(os.path.join(synth, "heldout", "eval.json")) as f:
        ev = json.load(f)
    for it in ev["generation"]:
        assert is_heldout_combo(it["colour"], it["shape"], it["position"])
        assert it["prompt"] == caption(Scene(it["colour"], it["shape"], it["size"], it["position"], it["background"]))
    for prefix in ("gen", "und"):
        for _, _, cap in _tar_samples(os.path.join(synth, "train", prefix + "-000.tar")):
            c, s, _, p, _ = _parse_caption(cap)
            assert not is_heldout_combo(c, s, p)


def test_tokenizer_fits_tiny_cpu_vocab(synth):
    from datacontract.tokenizer import load_tokenizer, resolve_token_spec

    tok = load_tokenizer(os.path.join(synth, "tokenizer"))
    assert len(tok) <= 512
    resolve_token_spec(tok)  # has the image special tokens, BOS and EOS
    for text in all_texts()[3:60]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    # every palette colour is one token after a space (the answer after "Assistant:")
    assert all(len(tok.encode(" " + c, add_special_tokens=False)) == 1 for c in PALETTE)


def test_dominant_colour_recovers_every_heldout_image(synth):
    root = os.path.join(synth, "heldout")
    with open(os.path.join(root, "eval.json")) as f:
        ev = json.load(f)
    checked = 0
    for it in ev["qa"]:
        with Image.open(os.path.join(root, it["image"])) as im:
            img = np.asarray(im.convert("RGB"))
        assert dominant_colour(img, ev["palette"]) == it["answer"]
        checked += 1
    for prefix in ("gen", "und"):
        for _, im, cap in _tar_samples(os.path.join(root, prefix + "-000.tar")):
            colour, *_, background = _parse_caption(cap)
            img = np.asarray(im.convert("RGB"))
            assert dominant_colour(img, ev["palette"]) == colour
            assert dominant_colour(img, ev["palette"], background=BACKGROUNDS[background]) == colour
            assert dominant_colour(img.astype(np.float32) / 255, ev["palette"]) == colour
            # also after the JPEG re-encoding that `build` applies by default
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=95, subsampling=0)
            assert dominant_colour(np.asarray(Image.open(buf).convert("RGB")), ev["palette"]) == colour
            checked += 1
    assert checked == 3 * N_HELDOUT


def test_shapes_stay_inside_and_use_exact_colours():
    rng = np.random.default_rng(0)
    for colour in PALETTE:
        for shape in SHAPES:
            for size in SIZES:
                for position in POSITIONS:
                    scene = Scene(colour, shape, size, position, "grey")
                    a = np.asarray(draw(scene, 32, rng)).reshape(-1, 3)
                    img = a.reshape(32, 32, 3)
                    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
                    assert (border == BACKGROUNDS["grey"]).all()
                    colours = {tuple(int(v) for v in px) for px in a}
                    assert colours == {PALETTE[colour], BACKGROUNDS["grey"]}
                    n = int((a == PALETTE[colour]).all(1).sum())
                    assert (15 <= n <= 110) if size == "small" else (80 <= n <= 400), (scene, n)


def test_build_reads_every_file_without_rejects(synth, tmp_path):
    from datacontract.shards import read_manifest

    out = str(tmp_path / "packed")
    args = build_command(synth, "train", out) + list(TINY_CPU_LAYOUT) + ["--workers", "1", "--quiet"]
    assert TINY_CPU_LAYOUT == ("--resolution", "32", "--und-patch", "8", "--gen-downsample", "4", "--gen-patch", "2",
                               "--seq-length", "256")
    assert main(args) == 0
    manifest = read_manifest(out)
    assert manifest["rejects"]["count"] == 0
    assert len(manifest["inputs"]) == 4
    for entry in manifest["inputs"]:
        assert entry["records_written"] == entry["records_in"] == N_TRAIN
        assert entry["records_rejected"] == 0 and entry["records_truncated"] == 0
