"""Held-out evaluation of the shapes data set (``python -m data_tools synth``): two accuracies.

Example:
  python -m pretrain.evaluate --heldout SYNTH/heldout --generated GEN_DIR --answers answers.jsonl

Inputs (no model code here; the demo writes them):
- ``--heldout DIR``: the synth held-out folder; its ``eval.json`` holds the palette, the
  backgrounds, the "generation" items ({"index", "prompt", "colour", ...}) and the "qa" items
  ({"index", "image", "question", "answer"}).
- ``--generated DIR``: one PNG (any size, RGB or RGBA or grey) per generation item, named by the
  item's index: ``DIR/<index>.png`` with optional zero padding (``7.png``, ``00007.png``). Files
  whose stem is not an integer are ignored; a missing index counts as wrong.
- ``--answers FILE``: jsonl, one ``{"index": <qa item index>, "answer": "<the model's text>"}`` per
  line; a missing index counts as wrong; a repeated index keeps the last line.

Measures:
- generation colour accuracy: the fraction of prompts whose image's dominant colour
  (``dominant_colour``) is the prompt's colour;
- QA accuracy: the fraction of colour questions answered right (``qa_accuracy``: case, whitespace
  and punctuation ignored; an answer counts when its first word is the expected word);
- chance: 1 / number of palette colours.
Prints them (``--json`` for one JSON object); ``--require X`` exits 1 when a measured accuracy is
below X; ``--details FILE`` writes one jsonl line per item (prediction and whether it was right).
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


def estimate_background(image) -> np.ndarray:
    """Per-channel median of the one-pixel border (0..255): the shape never covers most of it."""
    a = _as_rgb_255(image)
    border = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
    return np.median(border, axis=0)


def dominant_colour(image, palette: Palette, background: Optional[Sequence[float]] = None) -> Optional[str]:
    """The palette colour covering most of the image's non-background pixels, or None if there are none.

    ``image``: [H, W, 3] uint8 (0..255) or float (0..1). ``palette``: {name: (r, g, b)} in 0..255.
    ``background``: (r, g, b) in 0..255, default estimated from the image border. Each pixel goes to
    the nearest colour among the palette and the background (Euclidean RGB); pixels nearest to the
    background (or as near to it as to a colour) are ignored; the most frequent palette colour wins
    (ties: palette order).
    """
    if not palette:
        raise ValueError("empty palette")
    a = _as_rgb_255(image).reshape(-1, 3)
    bg = estimate_background(image) if background is None else np.asarray(background, np.float64)
    names = list(palette)
    # the background first: a pixel as near to it as to a palette colour is background
    centres = np.concatenate([bg[None], np.asarray([palette[n] for n in names], np.float64).reshape(-1, 3)])
    dist = ((a[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
    nearest = dist.argmin(1)
    counts = np.bincount(nearest, minlength=len(centres))[1:]
    if counts.max() == 0:
        return None
    return names[int(counts.argmax())]


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


def evaluate(heldout: str, generated: Optional[str] = None, answers: Optional[str] = None
             ) -> Tuple[dict, List[dict]]:
    """(report, per-item details) for whichever of ``generated`` and ``answers`` is given."""
    ev = load_eval(heldout)
    palette = ev["palette"]
    report = {"colours": len(palette), "chance": 1.0 / len(palette)}
    details = []
    if generated is not None:
        items = ev["generation"]
        files = read_generated(generated)
        right = 0
        for it in items:
            path = files.get(int(it["index"]))
            pred = dominant_colour(_load_png(path), palette) if path else None
            ok = pred == it["colour"]
            right += ok
            details.append({"task": "generation", "index": it["index"], "prompt": it["prompt"],
                            "expected": it["colour"], "predicted": pred, "right": ok, "missing": path is None})
        report["generation"] = {"accuracy": right / len(items) if items else 0.0, "right": right,
                                "total": len(items), "missing": sum(d["missing"] for d in details)}
    if answers is not None:
        items = ev["qa"]
        got = read_answers(answers)
        right = missing = 0
        for it in items:
            ans = got.get(int(it["index"]))
            ok = answer_is_right(ans, it["answer"])
            right += ok
            missing += ans is None
            details.append({"task": "qa", "index": it["index"], "question": it["question"],
                            "expected": it["answer"], "predicted": ans, "right": ok, "missing": ans is None})
        report["qa"] = {"accuracy": right / len(items) if items else 0.0, "right": right,
                        "total": len(items), "missing": missing}
    return report, details


def format_report(report: dict) -> str:
    lines = []
    for key, label in (("generation", "generation colour accuracy"), ("qa", "colour QA accuracy")):
        if key in report:
            r = report[key]
            lines.append(f"{label}: {r['accuracy']:.3f} ({r['right']}/{r['total']}"
                         + (f", {r['missing']} missing" if r["missing"] else "") + ")")
    lines.append(f"chance: {report['chance']:.3f} (1/{report['colours']} colours)")
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
        low = [k for k in ("generation", "qa") if k in report and report[k]["accuracy"] < args.require]
        if low:
            print(f"below {args.require}: {', '.join(low)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
