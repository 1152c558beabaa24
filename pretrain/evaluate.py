"""Held-out evaluation of the shapes data set (``python -m data_tools synth``): what a person sees.

Example:
  python -m pretrain.evaluate --heldout SYNTH/heldout --generated GEN_DIR --answers answers.jsonl

Inputs (no model code here; the demo writes them):
- ``--heldout DIR``: the synth held-out folder; its ``eval.json`` holds the palette, the
  backgrounds, the position centres, the "generation" items ({"index", "prompt", "colour",
  "shape", "position", "background", ...}) and the "qa" items ({"index", "image", "question",
  "answer"}).
- ``--generated DIR``: one PNG (RGB, RGBA, grey, 8 or 16 bit) per generation item, named by the
  item's index: ``DIR/<index>.png`` with optional zero padding (``7.png``, ``00007.png``); two
  names of one index (``7.png`` and ``007.png``) are an error. Files whose stem is not an ASCII
  integer are ignored; a missing index counts as wrong. Images must have eval.json's "resolution"
  (square) when it gives one, else at most 1024 x 1024 pixels. An image that cannot be read (not
  a PNG, truncated, the wrong size) counts as missing too: the report counts them ("unreadable")
  and each one's details row gives the reason ("unreadable"). Transparent pixels count as black.
- ``--answers FILE``: jsonl, one ``{"index": <qa item index>, "answer": "<the model's text>"}`` per
  line (the answer a string or null); a missing index counts as wrong; a repeated index keeps the
  last line.

Measures of the generated images (each against its prompt):
- colour accuracy: the image's dominant colour (``dominant_colour``) is the prompt's colour;
- shape accuracy: the largest connected region of the dominant colour (``shape_region``) is most
  like a circle, square or triangle drawn in its bounding box (``classify_shape``, by overlap);
- position accuracy: that region's centroid is nearest the prompt's position centre
  (``classify_position``);
- cleanliness: the mean absolute difference (0-255, over pixels and channels) between the image's
  one-pixel border and the prompt's background colour (``border_error``; the data set's images
  score 0: shapes never touch the border); its mean and median over the images.
QA accuracy: the fraction of colour questions answered right (``qa_accuracy``: case, whitespace
and punctuation ignored; an answer counts when its first word is the expected word).
Chance: 1 / number of palette colours.
Prints them as a table (``--json`` for one JSON object); ``--require X`` exits 1 when a measured
accuracy is below X; ``--details FILE`` writes one jsonl line per item (predictions, right or not).
Bad input (an unreadable or malformed eval.json or answers file, a folder that is not one) ends the
run with one line ``error: <file or key>: <what is wrong>`` on stderr and exit status 2.
"""

# The docstring above is also --help (build_parser): the measures it names (``dominant_colour``,
# ``shape_region``, ``classify_shape``, ``classify_position``, ``border_error``) are in
# pretrain/picture_measures.py; this module reads the files, scores the QA answers and reports.

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import struct
import sys
from typing import Dict, List, Mapping, NoReturn, Optional, Sequence, Tuple

import numpy as np

from pretrain.picture_measures import (SHAPES, border_error, classify_position, classify_shape, dominant_colour,
                                       shape_region)


def normalise_answer(text: Optional[str]) -> List[str]:
    """Lower-case words, punctuation removed: " Red." -> ["red"]."""
    return re.sub(r"[^\w\s]|_", " ", (text or "").lower()).split()


def answer_is_right(answer: Optional[str], expected: str) -> bool:
    got, want = normalise_answer(answer), normalise_answer(expected)
    return bool(got) and bool(want) and got[0] == want[0]


def qa_accuracy(answers: Sequence[Optional[str]], expected: Sequence[str]) -> float:
    """Fraction of answers whose first normalised word is the expected word (None counts as wrong)."""
    if len(answers) != len(expected):
        raise ValueError(f"{len(answers)} answers for {len(expected)} expected")
    if not answers:
        raise ValueError("no answers")
    return sum(answer_is_right(a, e) for a, e in zip(answers, expected)) / len(answers)


# ------------------------------------------------------------------------------------------ files


def _fail(where: str, what: str) -> NoReturn:
    raise ValueError(f"{where}: {what}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # JSON true is not index 1


def _read_text(path: str, what: str) -> str:
    """The UTF-8 text of ``path``; ValueError naming it (and saying to give ``what``) otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as err:
        _fail(path, f"cannot read ({err.strerror or err}); give {what}")
    except UnicodeDecodeError as err:
        _fail(path, f"not UTF-8 text ({err.reason} at byte {err.start}); give {what}")


def _check_vectors(ev: dict, where: str, key: str, length: int, top: float, required: bool = False) -> None:
    """``ev[key]``, when given (or ``required``): a non-empty {name: [``length`` numbers in 0..top]}."""
    table = ev.get(key)
    if table is None and not required:
        return
    if not isinstance(table, dict) or not table:
        _fail(f"{where}: {key}", f"missing or not a non-empty {{name: [{length} numbers]}} object")
    for name, v in table.items():
        if not (isinstance(v, list) and len(v) == length
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= top for x in v)):
            _fail(f"{where}: {key}[{name!r}]", f"must be {length} numbers in 0..{top:g}, got {json.dumps(v)}")


def _check_items(ev: dict, where: str, key: str, fields: Sequence[str], choices: Mapping[str, object]) -> None:
    """``ev[key]``: a list of objects, each with a unique integer "index" and string ``fields``; a
    field named in ``choices`` (also when optional) must be one of its values."""
    items = ev.get(key)
    if not isinstance(items, list):
        _fail(f"{where}: {key}", "missing or not a list of items")
    seen = {}
    for i, it in enumerate(items):
        at = f"{where}: {key}[{i}]"
        if not isinstance(it, dict):
            _fail(at, f"must be an object, got {json.dumps(it)[:60]}")
        for name in ("index", *fields):
            if name not in it:
                _fail(at, f"missing key {name!r}")
        if not _is_int(it["index"]):
            _fail(at, f"'index' must be an integer, got {json.dumps(it['index'])}")
        if it["index"] in seen:
            _fail(at, f"index {it['index']} repeats {key}[{seen[it['index']]}]")
        seen[it["index"]] = i
        for name in fields:
            if not isinstance(it[name], str):
                _fail(at, f"{name!r} must be a string, got {json.dumps(it[name])}")
        for name, allowed in choices.items():
            if name in it and it[name] not in allowed:
                _fail(at, f"{name} {json.dumps(it[name])} is not one of {', '.join(map(str, allowed))}")


def load_eval(heldout: str, items: Sequence[str] = ("generation", "qa")) -> dict:
    """The held-out folder's eval.json, checked: palette, backgrounds, positions, resolution, and the
    item lists named in ``items``. ValueError naming the file and key of what is wrong."""
    path = os.path.join(heldout, "eval.json")
    text = _read_text(path, "--heldout the synth held-out folder (python -m data_tools synth)")
    try:
        ev = json.loads(text)
    except ValueError as err:
        _fail(path, f"not valid JSON ({err}); rewrite it with python -m data_tools synth")
    if not isinstance(ev, dict):
        _fail(path, "must be a JSON object (the synth held-out eval.json)")
    _check_vectors(ev, path, "palette", 3, 255, required=True)
    _check_vectors(ev, path, "backgrounds", 3, 255)
    _check_vectors(ev, path, "positions", 2, 1)
    if ev.get("resolution") is not None and not (_is_int(ev["resolution"]) and ev["resolution"] > 0):
        _fail(f"{path}: resolution", f"must be a positive integer (pixels a side), got {json.dumps(ev['resolution'])}")
    if "generation" in items:
        fields, choices = ("prompt", "colour"), {"colour": ev["palette"]}
        if ev.get("backgrounds"):
            choices["background"] = ev["backgrounds"]
        if ev.get("positions"):  # files written before shapes and positions existed have neither
            fields += ("shape", "position")
            choices.update(shape=SHAPES, position=ev["positions"])
        _check_items(ev, path, "generation", fields, choices)
    if "qa" in items:
        _check_items(ev, path, "qa", ("question", "answer"), {})
    return ev


def read_generated(folder: str) -> Dict[int, str]:
    """{index: path} of the PNGs named by index (ASCII digits) in ``folder``; ValueError when it
    cannot be listed or two names give one index."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as err:
        _fail(folder, f"cannot list ({err.strerror or err}); give --generated a folder of <index>.png images")
    out = {}
    for name in names:
        stem, ext = os.path.splitext(name)
        if ext.lower() == ".png" and stem.isascii() and stem.isdigit():  # not "²": isdigit, but no int
            index = int(stem)
            if index in out:
                # An error, not one rejected item: which file is the model's is unknowable (most likely
                # one is left from an earlier run), and every choice would score leftovers unseen.
                _fail(folder, f"{os.path.basename(out[index])} and {name} both name generation item {index}; "
                              "remove the stale one")
            out[index] = os.path.join(folder, name)
    return out


def read_answers(path: str) -> Dict[int, Optional[str]]:
    """{qa item index: answer} of a jsonl file (a repeated index keeps the last line); ValueError
    naming the file and line of a line that is not {"index": <integer>, "answer": <string or null>}."""
    text = _read_text(path, '--answers a jsonl file of {"index", "answer"} lines')
    out = {}
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as err:
            _fail(f"{path}:{n}", f"not valid JSON ({err})")
        if not isinstance(obj, dict) or "index" not in obj:
            _fail(f"{path}:{n}", 'expected {"index": <qa item index>, "answer": "<text>"}')
        if not _is_int(obj["index"]):
            _fail(f"{path}:{n}", f"'index' must be an integer, got {json.dumps(obj['index'])}")
        if not isinstance(obj.get("answer"), (str, type(None))):
            _fail(f"{path}:{n}", f"'answer' must be a string or null, got {json.dumps(obj['answer'])}")
        out[obj["index"]] = obj.get("answer")
    return out


# Without a resolution in eval.json, images up to 1024 x 1024: scoring holds a few float arrays of
# the image and walks its largest region pixel by pixel, so memory and time grow with the pixels.
MAX_SIDE = 1024


class Unreadable(Exception):
    """A generated image that cannot be scored; the message is the reason. It counts as missing."""


def _load_png(path: str, resolution: Optional[int] = None) -> np.ndarray:
    """The PNG at ``path`` as a picture for ``pretrain.picture_measures``: [H, W, 3] or [H, W, 4]
    uint8, or [H, W] float in 0..1 for 16-bit grey. The size, read from the header before any
    decoding, must be ``resolution`` square if given, else at most ``MAX_SIDE`` squared pixels.
    ``Unreadable`` otherwise."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            head = f.read(24)
            if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
                raise Unreadable("not a PNG file" if head else "empty file")
            w, h = struct.unpack(">II", head[16:24])
            if resolution is not None and (w, h) != (resolution, resolution):
                raise Unreadable(f"{w} x {h} pixels, not the held-out {resolution} x {resolution}")
            elif w * h > MAX_SIDE ** 2:
                raise Unreadable(f"{w} x {h} pixels, larger than {MAX_SIDE} x {MAX_SIDE} "
                                 "(eval.json gives no resolution)")
            f.seek(0)
            with Image.open(f, formats=["PNG"]) as im:
                im.load()
                if im.mode.startswith("I"):  # 16-bit grey: scale 0..65535 down (convert would clip at 255)
                    return np.asarray(im, np.float64) / 65535.0
                alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
                return np.asarray(im.convert("RGBA" if alpha else "RGB"))
    except Unreadable:
        raise
    except Exception as err:  # noqa: BLE001 -- whatever a bad file makes PIL raise, one image ends no run
        raise Unreadable(getattr(err, "strerror", None) or str(err) or type(err).__name__) from None


def _generation_details(ev: dict, files: Dict[int, str]) -> List[dict]:
    """One row per generation item: predicted colour, shape, position and the border error; an
    image that cannot be read counts as missing, its row giving the reason ("unreadable")."""
    palette, backgrounds = ev["palette"], ev.get("backgrounds") or {}
    positions = ev.get("positions")  # absent in eval.json files written before shape/position existed
    rows = []
    for it in ev["generation"]:
        path = files.get(it["index"])
        row = {"task": "generation", "index": it["index"], "prompt": it["prompt"], "missing": path is None,
               "expected": it["colour"], "predicted": None, "right": False}
        image = None
        if path is not None:
            try:
                image = _load_png(path, ev.get("resolution"))
            except Unreadable as err:
                row["missing"], row["unreadable"] = True, f"{os.path.basename(path)}: {err}"
        if image is not None:
            row["predicted"] = dominant_colour(image, palette)
            row["right"] = row["predicted"] == it["colour"]
            if it.get("background") in backgrounds:
                row["border_error"] = border_error(image, backgrounds[it["background"]])
            region = shape_region(image, palette)
            if positions:
                row["shape"] = classify_shape(region) if region is not None else None
                row["position"] = classify_position(region, positions) if region is not None else None
        if positions:
            row["shape_right"] = row.get("shape") == it["shape"]
            row["position_right"] = row.get("position") == it["position"]
        rows.append(row)
    return rows


def _accuracy(rights: Sequence[bool], missing: int = 0) -> dict:
    right = int(sum(rights))
    return {"accuracy": right / len(rights) if rights else 0.0, "right": right, "total": len(rights),
            "missing": missing}


def evaluate(heldout: str, generated: Optional[str] = None, answers: Optional[str] = None
             ) -> Tuple[dict, List[dict]]:
    """(report, per-item details) for whichever of ``generated`` and ``answers`` is given.

    report: {"colours", "chance", "generation" (colour accuracy), "shape", "position" (accuracies),
    "unreadable" (how many of the generation "missing" are images that could not be read),
    "cleanliness" ({"mean", "median"} border error over the images scored), "qa"}; each accuracy
    is {"accuracy", "right", "total", "missing"}. ValueError on bad input (all of it is read and
    checked before any image is scored).
    """
    ev = load_eval(heldout, [k for k, given in (("generation", generated), ("qa", answers)) if given is not None])
    files = read_generated(generated) if generated is not None else None
    got = read_answers(answers) if answers is not None else None
    palette = ev["palette"]
    report = {"colours": len(palette), "chance": 1.0 / len(palette)}
    details = []
    if files is not None:
        rows = _generation_details(ev, files)
        missing = sum(r["missing"] for r in rows)
        report["generation"] = _accuracy([r["right"] for r in rows], missing)
        if ev.get("positions"):
            report["shape"] = _accuracy([r["shape_right"] for r in rows], missing)
            report["position"] = _accuracy([r["position_right"] for r in rows], missing)
        report["unreadable"] = sum("unreadable" in r for r in rows)
        errors = [r["border_error"] for r in rows if "border_error" in r]
        if errors:
            report["cleanliness"] = {"mean": float(np.mean(errors)), "median": float(np.median(errors)),
                                     "total": len(errors)}
        details += rows
    if got is not None:
        rows = []
        for it in ev["qa"]:
            ans = got.get(it["index"])
            rows.append({"task": "qa", "index": it["index"], "question": it["question"], "expected": it["answer"],
                         "predicted": ans, "right": answer_is_right(ans, it["answer"]), "missing": ans is None})
        report["qa"] = _accuracy([r["right"] for r in rows], sum(r["missing"] for r in rows))
        details += rows
    return report, details


# (report key, label) of the accuracies, in print order
ACCURACIES = (("generation", "generation colour"), ("shape", "generation shape"),
              ("position", "generation position"), ("qa", "colour QA"))


def format_report(report: dict) -> str:
    """A small table: one line per measure (value, right/total, missing), then chance."""
    lines = [f"{'held-out measure':<28}{'value':>8}  count"]
    for key, label in ACCURACIES:
        if key in report:
            r = report[key]
            unreadable = report.get("unreadable", 0) if key != "qa" else 0
            lines.append(f"{label + ' accuracy':<28}{r['accuracy']:>8.3f}  {r['right']}/{r['total']}"
                         + (f", {r['missing']} missing" if r["missing"] else "")
                         + (f" ({unreadable} unreadable)" if unreadable else ""))
    if "cleanliness" in report:
        c = report["cleanliness"]
        lines.append(f"{'border error (0-255, mean)':<28}{c['mean']:>8.1f}  median {c['median']:.1f} "
                     f"over {c['total']} images")
    lines.append(f"{'chance (colour)':<28}{report['chance']:>8.3f}  1/{report['colours']} colours")
    return "\n".join(lines)


def _threshold(text: str) -> float:
    """--require: an accuracy in 0..1 (nan would pass every comparison, so it is refused here)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an accuracy between 0 and 1 (e.g. 0.8)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.evaluate", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--heldout", required=True, help="the synth held-out folder (holds eval.json)")
    parser.add_argument("--generated", help="folder of PNGs named by generation item index")
    parser.add_argument("--answers", help="jsonl of {\"index\", \"answer\"} for the qa items")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--details", help="write per-item results here (jsonl)")
    parser.add_argument("--require", type=_threshold, default=None,
                        help="exit 1 when a measured accuracy is below this (e.g. 0.8)")
    return parser


def _open_details(path: Optional[str]):
    if path is None:
        return contextlib.nullcontext()
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as err:
        _fail(path, f"cannot write ({err.strerror or err}); give --details a file in an existing folder")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.generated is None and args.answers is None:
        parser.error("give --generated and/or --answers")
    try:
        with _open_details(args.details) as f:  # opened first: a bad path fails before the work
            report, details = evaluate(args.heldout, args.generated, args.answers)
            if f is not None:
                f.writelines(json.dumps(d) + "\n" for d in details)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    if args.require is not None:
        low = [k for k, _ in ACCURACIES if k in report and report[k]["accuracy"] < args.require]
        if low:
            print(f"below {args.require}: {', '.join(low)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
