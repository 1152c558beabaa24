"""Held-out evaluation of the shapes data set (``python -m data_tools synth``): what a person sees.

Example:
  python -m pretrain.evaluate --heldout SYNTH/heldout --generated GEN_DIR --answers answers.jsonl

Inputs (no model code here; the demo writes them):
- ``--heldout DIR``: the synth held-out folder; its ``eval.json`` holds the palette, the
  backgrounds, the position centres, the "generation" items ({"index", "prompt", "colour",
  "shape", "position", "background", ...}) and the "qa" items ({"index", "image", "question",
  "answer"}).
- ``--generated DIR``: one PNG (any size, RGB or RGBA or grey) per generation item, named by the
  item's index: ``DIR/<index>.png`` with optional zero padding (``7.png``, ``00007.png``). Files
  whose stem is not an integer are ignored; a missing index counts as wrong.
- ``--answers FILE``: jsonl, one ``{"index": <qa item index>, "answer": "<the model's text>"}`` per
  line; a missing index counts as wrong; a repeated index keeps the last line.

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
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

Palette = Mapping[str, Sequence[float]]


def _as_rgb_255(image) -> np.ndarray:
    """[H, W, 3] (or [H, W] / [H, W, 4]) uint8 in 0..255 or float in 0..1 -> float64 [H, W, 3] in 0..255."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"expected an [H, W, 3] image, got shape {a.shape}")
    a = a[..., :3]
    if np.issubdtype(a.dtype, np.floating):
        return np.clip(a.astype(np.float64), 0.0, 1.0) * 255.0
    return a.astype(np.float64)


def _border(a: np.ndarray) -> np.ndarray:
    """The one-pixel border of an [H, W, 3] array as [2H + 2W - 4, 3]."""
    return np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])


def estimate_background(image) -> np.ndarray:
    """Per-channel median of the one-pixel border (0..255): the shape never covers most of it."""
    return np.median(_border(_as_rgb_255(image)), axis=0)


def _nearest_centre(image, palette: Palette, background: Optional[Sequence[float]]) -> Tuple[np.ndarray, List[str]]:
    """([H, W] index of each pixel's nearest centre: 0 = the background, i + 1 = palette colour i; names).

    Euclidean RGB; a pixel as near to the background as to a palette colour is background.
    """
    if not palette:
        raise ValueError("empty palette")
    a = _as_rgb_255(image)
    bg = estimate_background(image) if background is None else np.asarray(background, np.float64)
    names = list(palette)
    centres = np.concatenate([bg[None], np.asarray([palette[n] for n in names], np.float64).reshape(-1, 3)])
    dist = ((a[:, :, None, :] - centres[None, None, :, :]) ** 2).sum(-1)
    return dist.argmin(-1), names


def dominant_colour(image, palette: Palette, background: Optional[Sequence[float]] = None) -> Optional[str]:
    """The palette colour covering most of the image's non-background pixels, or None if there are none.

    ``image``: [H, W, 3] uint8 (0..255) or float (0..1). ``palette``: {name: (r, g, b)} in 0..255.
    ``background``: (r, g, b) in 0..255, default estimated from the image border. Each pixel goes to
    the nearest colour among the palette and the background (Euclidean RGB); pixels nearest to the
    background (or as near to it as to a colour) are ignored; the most frequent palette colour wins
    (ties: palette order).
    """
    nearest, names = _nearest_centre(image, palette, background)
    winner = _most_frequent_colour(nearest, len(names))
    return None if winner is None else names[winner]


def _most_frequent_colour(nearest: np.ndarray, num_colours: int) -> Optional[int]:
    counts = np.bincount(nearest.ravel(), minlength=num_colours + 1)[1:]
    return None if counts.max() == 0 else int(counts.argmax())


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a boolean [H, W] mask (first found on ties)."""
    labels = np.zeros(mask.shape, np.int32)
    best, best_size, current = 0, 0, 0
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = current
                        stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask, dtype=bool)


def shape_region(image, palette: Palette, background: Optional[Sequence[float]] = None) -> Optional[np.ndarray]:
    """Boolean [H, W] mask of the largest connected region of the image's dominant colour (pixels
    assigned as in ``dominant_colour``), or None when no pixel is nearer a palette colour."""
    nearest, names = _nearest_centre(image, palette, background)
    winner = _most_frequent_colour(nearest, len(names))
    return None if winner is None else _largest_component(nearest == winner + 1)


# The data set's shapes, drawn in a box [x0, y0, x1, y1] (pixel centres, both ends included): the
# synth draws every shape inscribed in a square box, triangles with the apex at the top middle.
SHAPES = ("circle", "square", "triangle")


def _draw_template(shape: str, box: Sequence[int], size: Tuple[int, int]) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.new("1", size, 0)
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = box
    if shape == "circle":
        d.ellipse(box, fill=1)
    elif shape == "square":
        d.rectangle(box, fill=1)
    elif shape == "triangle":
        d.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=1)
    else:
        raise ValueError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
    return np.asarray(img, dtype=bool)


def classify_shape(region: np.ndarray) -> str:
    """The shape (``SHAPES``) whose drawing in the region's bounding box overlaps it best (IoU; ties:
    ``SHAPES`` order). ``region``: non-empty boolean [H, W] mask."""
    ys, xs = np.nonzero(region)
    if not len(ys):
        raise ValueError("empty region")
    box = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
    size = (region.shape[1], region.shape[0])
    ious = []
    for shape in SHAPES:
        template = _draw_template(shape, box, size)
        ious.append((template & region).sum() / (template | region).sum())
    return SHAPES[int(np.argmax(ious))]


def classify_position(region: np.ndarray, positions: Mapping[str, Sequence[float]]) -> str:
    """The position whose centre ((x, y) as fractions of the side, 0 = left/top) is nearest the
    region's centroid (pixel centres at (i + 0.5) / side). ``region``: non-empty boolean [H, W] mask."""
    ys, xs = np.nonzero(region)
    if not len(ys):
        raise ValueError("empty region")
    cx, cy = (xs.mean() + 0.5) / region.shape[1], (ys.mean() + 0.5) / region.shape[0]
    names = list(positions)
    d = [(cx - positions[n][0]) ** 2 + (cy - positions[n][1]) ** 2 for n in names]
    return names[int(np.argmin(d))]


def border_error(image, background: Sequence[float]) -> float:
    """Mean absolute difference (0..255) between the one-pixel border and ``background`` (r, g, b)."""
    return float(np.abs(_border(_as_rgb_255(image)) - np.asarray(background, np.float64)).mean())


def generation_colour_accuracy(images: Sequence, target_colours: Sequence[str], palette: Palette,
                               background: Optional[Sequence[float]] = None) -> float:
    """Fraction of images whose ``dominant_colour`` is the target; a None image counts as wrong."""
    if len(images) != len(target_colours):
        raise ValueError(f"{len(images)} images for {len(target_colours)} targets")
    if not images:
        raise ValueError("no images")
    right = sum(img is not None and dominant_colour(img, palette, background) == t
                for img, t in zip(images, target_colours))
    return right / len(images)


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


def load_eval(heldout: str) -> dict:
    with open(os.path.join(heldout, "eval.json"), encoding="utf-8") as f:
        return json.load(f)


def read_generated(folder: str) -> Dict[int, str]:
    """{index: path} of the PNGs named by index in ``folder``."""
    out = {}
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() == ".png" and stem.isdigit():
            out[int(stem)] = os.path.join(folder, name)
    return out


def read_answers(path: str) -> Dict[int, str]:
    out = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            if not isinstance(obj, dict) or "index" not in obj:
                raise ValueError(f"{path}:{n}: expected {{\"index\": ..., \"answer\": ...}}")
            out[int(obj["index"])] = obj.get("answer")
    return out


def _load_png(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _generation_details(ev: dict, files: Dict[int, str]) -> List[dict]:
    """One row per generation item: predicted colour, shape, position and the border error."""
    palette, backgrounds = ev["palette"], ev.get("backgrounds", {})
    positions = ev.get("positions")  # absent in eval.json files written before shape/position existed
    rows = []
    for it in ev["generation"]:
        path = files.get(int(it["index"]))
        row = {"task": "generation", "index": it["index"], "prompt": it["prompt"], "missing": path is None,
               "expected": it["colour"], "predicted": None, "right": False}
        if path is not None:
            image = _load_png(path)
            row["predicted"] = dominant_colour(image, palette)
            row["right"] = row["predicted"] == it["colour"]
            if it.get("background") in backgrounds:
                row["border_error"] = border_error(image, backgrounds[it["background"]])
            region = shape_region(image, palette)
            if positions is not None:
                row["shape"] = classify_shape(region) if region is not None else None
                row["position"] = classify_position(region, positions) if region is not None else None
        if positions is not None:
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
    "cleanliness" ({"mean", "median"} border error over the images present), "qa"}; each accuracy
    is {"accuracy", "right", "total", "missing"}.
    """
    ev = load_eval(heldout)
    palette = ev["palette"]
    report = {"colours": len(palette), "chance": 1.0 / len(palette)}
    details = []
    if generated is not None:
        rows = _generation_details(ev, read_generated(generated))
        missing = sum(r["missing"] for r in rows)
        report["generation"] = _accuracy([r["right"] for r in rows], missing)
        if "positions" in ev:
            report["shape"] = _accuracy([r["shape_right"] for r in rows], missing)
            report["position"] = _accuracy([r["position_right"] for r in rows], missing)
        errors = [r["border_error"] for r in rows if "border_error" in r]
        if errors:
            report["cleanliness"] = {"mean": float(np.mean(errors)), "median": float(np.median(errors)),
                                     "total": len(errors)}
        details += rows
    if answers is not None:
        got = read_answers(answers)
        rows = []
        for it in ev["qa"]:
            ans = got.get(int(it["index"]))
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
            lines.append(f"{label + ' accuracy':<28}{r['accuracy']:>8.3f}  {r['right']}/{r['total']}"
                         + (f", {r['missing']} missing" if r["missing"] else ""))
    if "cleanliness" in report:
        c = report["cleanliness"]
        lines.append(f"{'border error (0-255, mean)':<28}{c['mean']:>8.1f}  median {c['median']:.1f} "
                     f"over {c['total']} images")
    lines.append(f"{'chance (colour)':<28}{report['chance']:>8.3f}  1/{report['colours']} colours")
    return "\n".join(lines)


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
    parser.add_argument("--require", type=float, default=None,
                        help="exit 1 when a measured accuracy is below this (e.g. 0.8)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.generated is None and args.answers is None:
        raise SystemExit("give --generated and/or --answers")
    report, details = evaluate(args.heldout, args.generated, args.answers)
    if args.details:
        with open(args.details, "w", encoding="utf-8") as f:
            for d in details:
                f.write(json.dumps(d) + "\n")
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    if args.require is not None:
        low = [k for k, _ in ACCURACIES if k in report and report[k]["accuracy"] < args.require]
        if low:
            print(f"below {args.require}: {', '.join(low)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
