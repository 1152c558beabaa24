"""pretrain.evaluate: dominant colour, the two accuracies and the CLI on hand-made cases."""

import json

import numpy as np
import pytest
from PIL import Image

from pretrain.evaluate import (answer_is_right, dominant_colour, estimate_background, generation_colour_accuracy,
                               main, normalise_answer, qa_accuracy)

PALETTE = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


def _image(bg=(0, 0, 0), blocks=(), size=16):
    img = np.zeros((size, size, 3), np.uint8)
    img[:] = bg
    for (y0, y1, x0, x1), colour in blocks:
        img[y0:y1, x0:x1] = colour
    return img


def test_dominant_colour_ignores_background_and_takes_the_majority():
    assert dominant_colour(_image(blocks=[((2, 6, 2, 6), (255, 0, 0))]), PALETTE) == "red"
    # grey background; a big blue block beats a small white one
    img = _image((100, 100, 100), [((2, 10, 2, 10), (0, 0, 255)), ((12, 14, 12, 14), (255, 255, 255))])
    assert dominant_colour(img, PALETTE) == "blue"
    # the background is not a candidate even when it is most of the image
    assert dominant_colour(_image(blocks=[((7, 8, 7, 8), (0, 250, 10))]), PALETTE) == "green"
    # nothing but background
    assert dominant_colour(_image((30, 30, 30)), PALETTE) is None


def test_dominant_colour_inputs_noise_and_explicit_background():
    img = _image(blocks=[((3, 12, 3, 12), (255, 0, 0))])
    assert dominant_colour(img.astype(np.float32) / 255.0, PALETTE) == "red"
    rng = np.random.default_rng(0)
    noisy = np.clip(img.astype(float) + rng.normal(0, 40, img.shape), 0, 255).astype(np.uint8)
    assert dominant_colour(noisy, PALETTE) == "red"
    # dim red: nearer the black background than red itself, so ignored
    assert dominant_colour(_image(blocks=[((3, 12, 3, 12), (90, 0, 0))]), PALETTE) is None
    # an explicit background replaces the border estimate: a shape touching the whole border
    full = _image((0, 0, 255), [((4, 12, 4, 12), (0, 255, 0))])
    assert np.allclose(estimate_background(full), (0, 0, 255))
    assert dominant_colour(full, PALETTE) == "green"
    assert dominant_colour(full, PALETTE, background=(0, 0, 0)) == "blue"
    # RGBA and greyscale inputs
    rgba = np.concatenate([img, np.full(img.shape[:2] + (1,), 255, np.uint8)], -1)
    assert dominant_colour(rgba, PALETTE) == "red"
    grey = np.zeros((8, 8), np.uint8)
    grey[2:6, 2:6] = 255
    assert dominant_colour(grey, PALETTE) == "white"
    with pytest.raises(ValueError):
        dominant_colour(np.zeros((4, 4, 2)), PALETTE)


def test_generation_colour_accuracy():
    red = _image(blocks=[((2, 8, 2, 8), (255, 0, 0))])
    blue = _image(blocks=[((2, 8, 2, 8), (0, 0, 255))])
    assert generation_colour_accuracy([red, blue, red, blue], ["red", "blue", "blue", "blue"], PALETTE) == 0.75
    assert generation_colour_accuracy([red, None], ["red", "red"], PALETTE) == 0.5
    with pytest.raises(ValueError):
        generation_colour_accuracy([red], ["red", "blue"], PALETTE)
    with pytest.raises(ValueError):
        generation_colour_accuracy([], [], PALETTE)


def test_qa_accuracy_normalises_and_takes_the_first_word():
    assert normalise_answer("  Red. Circle!") == ["red", "circle"]
    assert answer_is_right("Red.", "red") and answer_is_right(" RED circle", "red")
    assert answer_is_right("red<eos>", "red")  # the "<" splits words
    assert not answer_is_right("The red one", "red") and not answer_is_right("reddish", "red")
    assert not answer_is_right("", "red") and not answer_is_right(None, "red")
    answers = ["Red.", "blue", "green!", "it is red", None]
    assert qa_accuracy(answers, ["red", "blue", "red", "red", "red"]) == pytest.approx(2 / 5)
    with pytest.raises(ValueError):
        qa_accuracy(["red"], [])


@pytest.fixture
def heldout(tmp_path):
    ev = {"palette": {k: list(v) for k, v in PALETTE.items()}, "chance": 0.25,
          "generation": [{"index": i, "prompt": f"a {c} square", "colour": c}
                         for i, c in enumerate(["red", "blue", "green", "white"])],
          "qa": [{"index": i, "image": f"images/{i:06d}.png", "question": "What colour is the square?",
                  "answer": a} for i, a in enumerate(["red", "blue", "green", "white", "red"])]}
    (tmp_path / "heldout").mkdir()
    (tmp_path / "heldout" / "eval.json").write_text(json.dumps(ev))
    gen = tmp_path / "gen"
    gen.mkdir()
    # 0 right, 1 wrong colour, 2 right (unpadded name), 3 missing; plus files to ignore
    for name, colour in (("00000.png", (255, 0, 0)), ("00001.png", (255, 0, 0)), ("2.png", (0, 255, 0))):
        Image.fromarray(_image(blocks=[((4, 10, 4, 10), colour)])).save(gen / name)
    (gen / "notes.txt").write_text("x")
    Image.fromarray(_image()).save(gen / "grid.png")
    answers = tmp_path / "answers.jsonl"
    answers.write_text("\n".join(json.dumps(x) for x in [
        {"index": 0, "answer": "Red."}, {"index": 1, "answer": "green"}, {"index": 2, "answer": "blue"},
        {"index": 2, "answer": " green"}, {"index": 3, "answer": "white square"}]) + "\n\n")
    return tmp_path


def test_cli_prints_both_accuracies_and_chance(heldout, capsys):
    args = ["--heldout", str(heldout / "heldout"), "--generated", str(heldout / "gen"),
            "--answers", str(heldout / "answers.jsonl")]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "generation colour accuracy: 0.500 (2/4, 1 missing)" in text
    assert "colour QA accuracy: 0.600 (3/5, 1 missing)" in text
    assert "chance: 0.250 (1/4 colours)" in text
    details = heldout / "details.jsonl"
    assert main(args + ["--json", "--details", str(details)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["generation"] == {"accuracy": 0.5, "right": 2, "total": 4, "missing": 1}
    assert report["qa"]["accuracy"] == pytest.approx(0.6) and report["chance"] == 0.25
    rows = [json.loads(line) for line in details.read_text().splitlines()]
    assert len(rows) == 9 and rows[1]["predicted"] == "red" and not rows[1]["right"]
    assert main(args + ["--require", "0.5"]) == 0
    assert main(args + ["--require", "0.8"]) == 1
    assert main(["--heldout", str(heldout / "heldout"), "--answers", str(heldout / "answers.jsonl")]) == 0
    with pytest.raises(SystemExit):
        main(["--heldout", str(heldout / "heldout")])
