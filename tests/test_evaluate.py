"""pretrain.evaluate on held-out folders: the report (colour, shape, position, cleanliness of hand-made
images), QA scoring, bad input and the CLI. The measures of one picture are tested in
tests/test_picture_measures.py, whose image helpers this file uses."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from pretrain.evaluate import answer_is_right, evaluate, main, normalise_answer, qa_accuracy
from tests.test_picture_measures import PALETTE, POSITIONS, _drawn, _image

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
    assert re.search(r"generation colour accuracy +0\.500  2/4, 1 missing", text)
    assert re.search(r"colour QA accuracy +0\.600  3/5, 1 missing", text)
    assert re.search(r"chance \(colour\) +0\.250  1/4 colours", text)
    assert "shape" not in text and "border" not in text  # this eval.json has no positions or backgrounds
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


# ------------------------------------------------------------------ shape, position, cleanliness


@pytest.fixture
def shapes_heldout(tmp_path):
    """Four prompts with shapes and positions: 0 all right, 1 wrong shape, 2 wrong position and a
    noisy border, 3 missing."""
    bgs = {"black": [0, 0, 0], "grey": [100, 100, 100]}
    gen = [{"index": 0, "prompt": "p0", "colour": "red", "shape": "circle", "position": "top left", "background": "black"},
           {"index": 1, "prompt": "p1", "colour": "blue", "shape": "square", "position": "centre", "background": "grey"},
           {"index": 2, "prompt": "p2", "colour": "green", "shape": "triangle", "position": "top right",
            "background": "black"},
           {"index": 3, "prompt": "p3", "colour": "red", "shape": "circle", "position": "centre", "background": "grey"}]
    ev = {"palette": {k: list(v) for k, v in PALETTE.items()}, "backgrounds": bgs, "chance": 0.25,
          "positions": {k: list(v) for k, v in POSITIONS.items()}, "generation": gen, "qa": []}
    (tmp_path / "heldout").mkdir()
    (tmp_path / "heldout" / "eval.json").write_text(json.dumps(ev))
    out = tmp_path / "gen"
    out.mkdir()
    Image.fromarray(_drawn("circle", (3, 3, 12, 12))).save(out / "0.png")
    Image.fromarray(_drawn("triangle", (10, 10, 21, 21), colour=(0, 0, 255), bg=(100, 100, 100))).save(out / "1.png")
    wrong_place = _drawn("triangle", (3, 20, 12, 29), colour=(0, 255, 0))
    wrong_place[0, :] = (40, 40, 40)
    Image.fromarray(wrong_place).save(out / "2.png")
    return tmp_path


def test_report_has_shape_position_and_cleanliness(shapes_heldout, capsys):
    report, details = evaluate(str(shapes_heldout / "heldout"), str(shapes_heldout / "gen"))
    assert report["generation"] == {"accuracy": 0.75, "right": 3, "total": 4, "missing": 1}
    assert report["shape"] == {"accuracy": 0.5, "right": 2, "total": 4, "missing": 1}
    assert report["position"] == {"accuracy": 0.5, "right": 2, "total": 4, "missing": 1}
    # border errors 0, 0 and 32 pixels of 40 in 124 border pixels: mean over the three present images
    errors = [0.0, 0.0, 32 * 40 / 124]
    assert report["cleanliness"]["mean"] == pytest.approx(np.mean(errors))
    assert report["cleanliness"]["median"] == 0.0 and report["cleanliness"]["total"] == 3
    assert [d["shape"] for d in details[:3]] == ["circle", "triangle", "triangle"]
    assert [d["position"] for d in details[:3]] == ["top left", "centre", "bottom left"]
    assert main(["--heldout", str(shapes_heldout / "heldout"), "--generated", str(shapes_heldout / "gen")]) == 0
    text = capsys.readouterr().out
    assert "generation shape accuracy" in text and "generation position accuracy" in text
    assert "border error (0-255, mean)" in text and "median 0.0 over 3 images" in text


# ------------------------------------------------------------------ bad input: one line, exit 2


def _eval_doc(**changes):
    ev = {"palette": {k: list(v) for k, v in PALETTE.items()},
          "generation": [{"index": 0, "prompt": "a red square", "colour": "red"},
                         {"index": 1, "prompt": "a blue square", "colour": "blue"}],
          "qa": [{"index": 0, "question": "What colour?", "answer": "red"}]}
    ev.update(changes)
    return ev


def _setup(tmp_path, eval_json=None):
    """heldout/eval.json (a dict as JSON; str or bytes as they are), an empty gen/ and answers.jsonl."""
    eval_json = _eval_doc() if eval_json is None else eval_json
    (tmp_path / "heldout").mkdir(exist_ok=True)
    data = json.dumps(eval_json) if isinstance(eval_json, (dict, list)) else eval_json
    (tmp_path / "heldout" / "eval.json").write_bytes(data.encode() if isinstance(data, str) else data)
    (tmp_path / "gen").mkdir(exist_ok=True)
    (tmp_path / "answers.jsonl").write_text('{"index": 0, "answer": "red"}\n')
    return ["--heldout", str(tmp_path / "heldout"), "--generated", str(tmp_path / "gen"),
            "--answers", str(tmp_path / "answers.jsonl")]


def _one_error_line(capsys, *fragments):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def _item(**changes):
    return {"index": 0, "prompt": "p", "colour": "red", **changes}


@pytest.mark.parametrize("eval_json, fragment", [
    ("", "eval.json: not valid JSON"),
    ('{"palette": {"red": [255, 0', "eval.json: not valid JSON"),
    (b"\xff\xfe{}", "eval.json: not UTF-8 text"),
    ([], "eval.json: must be a JSON object"),
    ({"generation": [], "qa": []}, "eval.json: palette: missing"),
    (_eval_doc(palette={}), "eval.json: palette: missing or not a non-empty"),
    (_eval_doc(palette={"red": [255, 0]}), "eval.json: palette['red']: must be 3 numbers in 0..255, got [255, 0]"),
    (_eval_doc(palette={"red": [255, 0, "x"]}), "eval.json: palette['red']"),
    (_eval_doc(qa=None), "eval.json: qa: missing or not a list"),
    (_eval_doc(generation=[_item(), {"index": 1, "prompt": "p"}]), "eval.json: generation[1]: missing key 'colour'"),
    (_eval_doc(generation=[_item(index="zero")]), "eval.json: generation[0]: 'index' must be an integer, got \"zero\""),
    (_eval_doc(generation=[_item(index=True)]), "generation[0]: 'index' must be an integer, got true"),
    (_eval_doc(generation=[_item(), _item()]), "generation[1]: index 0 repeats generation[0]"),
    (_eval_doc(generation=[_item(colour="purple")]), "generation[0]: colour \"purple\" is not one of red"),
    (_eval_doc(generation=["x"]), "generation[0]: must be an object"),
    (_eval_doc(qa=[{"index": 0, "question": "q", "answer": 3}]), "qa[0]: 'answer' must be a string, got 3"),
    (_eval_doc(resolution=0), "eval.json: resolution: must be a positive integer"),
    (_eval_doc(positions={"centre": [0.5, 0.5]}), "generation[0]: missing key 'shape'"),
])
def test_cli_bad_eval_json_is_one_error_line(tmp_path, capsys, eval_json, fragment):
    assert main(_setup(tmp_path, eval_json)) == 2
    _one_error_line(capsys, str(tmp_path / "heldout" / "eval.json"), fragment)


def test_cli_missing_eval_json_and_bad_generated_folder(tmp_path, capsys):
    args = _setup(tmp_path)
    (tmp_path / "heldout" / "eval.json").unlink()
    assert main(args) == 2
    _one_error_line(capsys, "eval.json: cannot read (No such file or directory); give --heldout")
    args = _setup(tmp_path)
    for gen, what in ((tmp_path / "nowhere", "No such file"), (tmp_path / "answers.jsonl", "Not a directory")):
        assert main(args[:3] + [str(gen)]) == 2
        _one_error_line(capsys, f"{gen}: cannot list ({what}", "give --generated")
    # two names of one index: an error naming both (which one is the model's is unknowable)
    for name in ("5.png", "005.png"):
        Image.fromarray(_image()).save(tmp_path / "gen" / name)
    assert main(args) == 2
    _one_error_line(capsys, "005.png and 5.png both name generation item 5")


@pytest.mark.parametrize("line, fragment", [
    ('{"index": 0, "answer": "red"', ":2: not valid JSON"),
    ('[0, "red"]', ':2: expected {"index"'),
    ('{"answer": "red"}', ':2: expected {"index"'),
    ('{"index": "abc", "answer": "red"}', ":2: 'index' must be an integer, got \"abc\""),
    ('{"index": null, "answer": "red"}', ":2: 'index' must be an integer, got null"),
    ('{"index": 0.7, "answer": "red"}', ":2: 'index' must be an integer, got 0.7"),
    ('{"index": true, "answer": "red"}', ":2: 'index' must be an integer, got true"),
    ('{"index": 0, "answer": 5}', ":2: 'answer' must be a string or null, got 5"),
    ('{"index": 0, "answer": ["red"]}', ":2: 'answer' must be a string or null"),
])
def test_cli_bad_answers_line_names_file_and_line(tmp_path, capsys, line, fragment):
    args = _setup(tmp_path)
    (tmp_path / "answers.jsonl").write_text('{"index": 0, "answer": "red"}\n' + line + "\n")
    assert main(args) == 2
    _one_error_line(capsys, str(tmp_path / "answers.jsonl") + fragment)


def test_cli_unreadable_answers_and_details_paths(tmp_path, capsys):
    args = _setup(tmp_path)
    answers = tmp_path / "answers.jsonl"
    for path, what in ((tmp_path / "none.jsonl", "cannot read (No such file"), (tmp_path / "gen", "cannot read (Is a"),
                       (answers, "not UTF-8 text")):
        answers.write_bytes(b'{"index": 0, "answer": "r\xe9d"}\n')
        assert main(args[:5] + [str(path)]) == 2
        _one_error_line(capsys, f"{path}: {what}")
    answers.write_text('{"index": 0, "answer": "red"}\n')
    (tmp_path / "afile").write_text("x")
    for details, what in ((tmp_path / "no" / "d.jsonl", "No such file"), (tmp_path / "gen", "Is a directory"),
                          (tmp_path / "afile" / "d.jsonl", "Not a directory")):
        assert main(args + ["--details", str(details)]) == 2
        _one_error_line(capsys, f"{details}: cannot write ({what}", "give --details")
    assert main(args + ["--details", str(tmp_path / "d.jsonl")]) == 0
    assert len((tmp_path / "d.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("value", ["nan", "inf", "-0.1", "1.5", "abc"])
def test_cli_require_must_be_an_accuracy(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exc:
        main(_setup(tmp_path) + ["--require", value])
    assert exc.value.code == 2
    assert f"argument --require: {value!r} is not an accuracy between 0 and 1" in capsys.readouterr().err


# ------------------------------------------------------------------ unreadable images: counted, not fatal


def _png_header(width, height):
    """The first bytes of a PNG that claims ``width`` x ``height`` pixels (no image data)."""
    import struct
    import zlib

    body = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body))


def test_unreadable_images_count_as_missing_with_their_reason(tmp_path, capsys):
    import io

    items = [{"index": i, "prompt": f"p{i}", "colour": "red"} for i in range(9)]
    args = _setup(tmp_path, _eval_doc(generation=items))
    gen = tmp_path / "gen"
    good = _image(blocks=[((4, 10, 4, 10), (255, 0, 0))])
    Image.fromarray(good).save(gen / "0.png")
    buf = io.BytesIO()
    Image.fromarray(good).save(buf, "PNG")
    (gen / "1.png").write_bytes(b"")
    (gen / "2.png").write_bytes(buf.getvalue()[:60])  # truncated
    (gen / "3.png").write_text("not an image")
    (gen / "4.png").mkdir()
    (gen / "5.png").symlink_to(gen / "gone.png")  # dangling
    (gen / "6.png").write_bytes(_png_header(20000, 20000))  # refused from the header: no decoding
    Image.new("RGB", (1025, 1024)).save(gen / "7.png")
    Image.fromarray(good).save(gen / "².png")  # a digit to str.isdigit, not an index: ignored
    report, details = evaluate(str(tmp_path / "heldout"), str(gen))
    assert report["generation"] == {"accuracy": 1 / 9, "right": 1, "total": 9, "missing": 8}
    assert report["unreadable"] == 7
    reasons = {d["index"]: d.get("unreadable") for d in details}
    assert reasons[0] is None and reasons[8] is None and details[8]["missing"]
    assert reasons[1] == "1.png: empty file" and reasons[3] == "3.png: not a PNG file"
    assert "truncated" in reasons[2] and "Is a directory" in reasons[4] and "No such file" in reasons[5]
    assert reasons[6] == "6.png: 20000 x 20000 pixels, larger than 1024 x 1024 (eval.json gives no resolution)"
    assert reasons[7].startswith("7.png: 1025 x 1024 pixels, larger than")
    assert all(d["missing"] for d in details[1:])
    assert main(args[:4]) == 0
    assert re.search(r"generation colour accuracy +0\.111  1/9, 8 missing \(7 unreadable\)", capsys.readouterr().out)


def test_images_must_have_the_heldout_resolution(tmp_path):
    args = _setup(tmp_path, _eval_doc(resolution=16))
    Image.fromarray(_image(blocks=[((4, 10, 4, 10), (255, 0, 0))], size=16)).save(tmp_path / "gen" / "0.png")
    Image.fromarray(_image(blocks=[((4, 10, 4, 10), (0, 0, 255))], size=32)).save(tmp_path / "gen" / "1.png")
    report, details = evaluate(args[1], args[3])
    assert report["generation"] == {"accuracy": 0.5, "right": 1, "total": 2, "missing": 1}
    assert details[1]["unreadable"] == "1.png: 32 x 32 pixels, not the held-out 16 x 16"


# ------------------------------------------------------------------ what a person sees: alpha, 16-bit


def _scored(tmp_path, images, background="black"):
    """evaluate() on PNGs (PIL images) against red squares on ``background``: the details rows."""
    bgs = {"black": [0, 0, 0], "grey": [100, 100, 100]}
    items = [{"index": i, "prompt": f"p{i}", "colour": "red", "background": background} for i in range(len(images))]
    args = _setup(tmp_path, _eval_doc(generation=items, backgrounds=bgs))
    for i, im in enumerate(images):
        im.save(tmp_path / "gen" / f"{i}.png")
    return evaluate(args[1], args[3])[1]


def test_transparent_pixels_are_scored_as_black(tmp_path):
    hidden = np.zeros((16, 16, 4), np.uint8)
    hidden[..., :3] = (255, 255, 255)
    hidden[4:10, 4:10, :3] = (255, 0, 0)  # all fully transparent: a person sees nothing
    shown = hidden.copy()
    shown[4:10, 4:10, 3] = 255  # only the square is opaque: a red square on black
    half = shown.copy()
    half[4:10, 4:10, 3] = 100  # a faint red (100, 0, 0) square: nearer black than red
    palette = Image.fromarray(_image(bg=(255, 255, 255), blocks=[((4, 10, 4, 10), (255, 0, 0))])).quantize(2)
    palette.info["transparency"] = palette.getpixel((0, 0))  # the white background transparent
    rows = _scored(tmp_path, [Image.fromarray(hidden, "RGBA"), Image.fromarray(shown, "RGBA"),
                              Image.fromarray(half, "RGBA"), palette])
    assert [r["predicted"] for r in rows] == [None, "red", None, "red"]
    assert [r["border_error"] for r in rows] == [0.0, 0.0, 0.0, 0.0]


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    grey = np.full((16, 16), 100 * 257, np.uint16)  # 100 of 255, in 16 bits
    grey[4:10, 4:10] = 65535
    im = Image.fromarray(grey)
    assert im.mode == "I;16"
    rows = _scored(tmp_path, [im], background="grey")
    assert rows[0]["border_error"] == pytest.approx(0.0) and rows[0]["predicted"] == "white"
