"""``python -m data_tools synth``: a procedurally generated image–text data set of coloured shapes.

Every image is one shape (circle, square or triangle) of one palette colour (red, green, blue,
yellow, magenta, white: corners of the RGB cube), small or large, in one of five positions (top
left, top right, bottom left, bottom right, centre), on a plain black or grey (100, 100, 100)
background; drawn with PIL (no antialiasing, so shape pixels are exactly the palette colour).
The data come in the raw formats real data come in, ready for ``python -m data_tools build``:

```
DIR/synth.json                 parameters, palette, backgrounds, held-out combinations, counts
DIR/tokenizer/                 small byte-level BPE tokenizer (transformers format, len <= 512)
DIR/train/gen-000.tar          webdataset: KEY.png + KEY.txt caption (text-to-image pairs)
DIR/train/und-000.tar          webdataset: KEY.png + KEY.txt caption (captioning, understanding)
DIR/train/qa.json              LLaVA-style conversations; images under train/images/
DIR/train/images/KEY.png
DIR/train/text.jsonl           {"text": ...} short sentences about shapes and colours
DIR/heldout/...                the same files for the held-out split, plus
DIR/heldout/eval.json          {"palette", "backgrounds", "chance", "resolution", "shapes",
                                "positions" ({name: [x, y]} centres as fractions of the side),
                                "generation": [{"index", "prompt", "colour", "shape", "size",
                                                "position", "background"}],
                                "qa": [{"index", "image", "question", "answer", "combo_heldout"}]}
```
(tars hold at most 10,000 samples each: gen-000.tar, gen-001.tar, ...). ``eval.json`` "qa" image
paths are relative to ``heldout/``.

Caption: "a small red circle in the top left on a black background". Conversations: the first turn
is always "<image>\\nWhat colour is the circle?" -> "red"; about half the records add one more turn
("What shape is shown?" -> "circle", "Is the circle small or large?" -> "small", "Where is the
circle?" -> "top left").

Held-out split: drawn from other random streams than the training split (a different image for
every sample) and, for generation, from colour x shape x position combinations that never occur in
training: a fifth of the triples (those with (colour + shape + position) % 5 == 0, by index) are
held out, so every colour, shape and position, and every pair of them, is still seen in training.
The held-out understanding data (captions, conversations, the "qa" eval items) are drawn over all
triples (``combo_heldout`` marks the unseen ones), so colour questions stay in distribution.

Deterministic: the same options give the same bytes. The tokenizer is trained on the full
enumeration of captions, questions, answers and sentences (plus ``DEMO_TEXTS``), so it does not
depend on the seed or the sizes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import shutil
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from .synthetic import write_jsonl, write_tar

# Corners of the RGB cube: pairwise distance >= 255, and far from both backgrounds.
PALETTE: Dict[str, Tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
}
# Never a palette colour; grey is >= 200 away from every palette colour.
BACKGROUNDS: Dict[str, Tuple[int, int, int]] = {"black": (0, 0, 0), "grey": (100, 100, 100)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "centre")
# Centre of each position, as a fraction of the side (x, y).
_POSITION_XY = {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
                "bottom right": (0.75, 0.75), "centre": (0.5, 0.5)}
# Radius range (half the side of the bounding box) as a fraction of the image side.
_RADIUS = {"small": (0.09, 0.125), "large": (0.19, 0.22)}
_JITTER = 1.0 / 16  # centre moves by up to this fraction of the side
SAMPLES_PER_TAR = 10_000
TOKENIZER_VOCAB = 512


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    size: str
    position: str
    background: str

    @property
    def triple(self) -> Tuple[str, str, str]:
        return (self.colour, self.shape, self.position)


def is_heldout_combo(colour: str, shape: str, position: str) -> bool:
    """Whether a colour x shape x position triple is reserved for the held-out generation prompts."""
    c, s, p = list(PALETTE).index(colour), SHAPES.index(shape), POSITIONS.index(position)
    return (c + s + p) % 5 == 0


def heldout_combos() -> List[Tuple[str, str, str]]:
    return [(c, s, p) for c in PALETTE for s in SHAPES for p in POSITIONS if is_heldout_combo(c, s, p)]


def caption(scene: Scene) -> str:
    return f"a {scene.size} {scene.colour} {scene.shape} in the {scene.position} on a {scene.background} background"


def colour_question(shape: str) -> str:
    return f"What colour is the {shape}?"


def _extra_turns(scene: Scene) -> List[Tuple[str, str]]:
    """The optional second-turn questions (and answers) about a scene."""
    return [
        ("What shape is shown?", scene.shape),
        (f"Is the {scene.shape} small or large?", scene.size),
        (f"Where is the {scene.shape}?", scene.position),
    ]


def draw(scene: Scene, resolution: int, rng: np.random.Generator) -> Image.Image:
    """The scene as an RGB image; the exact radius and centre are drawn from ``rng``."""
    img = Image.new("RGB", (resolution, resolution), BACKGROUNDS[scene.background])
    lo, hi = _RADIUS[scene.size]
    r = max(1.0, float(rng.uniform(lo, hi)) * resolution)
    fx, fy = _POSITION_XY[scene.position]
    jitter = rng.uniform(-_JITTER, _JITTER, 2) * resolution
    # keep the whole shape inside the image with a one pixel margin
    cx = float(np.clip(fx * resolution + jitter[0], r + 1, resolution - 2 - r))
    cy = float(np.clip(fy * resolution + jitter[1], r + 1, resolution - 2 - r))
    box = [round(cx - r), round(cy - r), round(cx + r), round(cy + r)]
    d = ImageDraw.Draw(img)
    fill = PALETTE[scene.colour]
    if scene.shape == "circle":
        d.ellipse(box, fill=fill)
    elif scene.shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([((box[0] + box[2]) / 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    return img


def png_bytes(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def _rng(seed: int, split: str, kind: str) -> np.random.Generator:
    """An independent stream per (seed, split, kind)."""
    return np.random.default_rng([seed, ("train", "heldout").index(split),
                                  ("gen", "und", "qa", "text", "eval").index(kind)])


def sample_scenes(rng: np.random.Generator, n: int, triples: Sequence[Tuple[str, str, str]]) -> List[Scene]:
    picks = rng.integers(len(triples), size=n)
    sizes = rng.integers(len(SIZES), size=n)
    bgs = rng.integers(len(BACKGROUNDS), size=n)
    names = list(BACKGROUNDS)
    return [Scene(*triples[t][:2], SIZES[s], triples[t][2], names[b]) for t, s, b in zip(picks, sizes, bgs)]


def _sentences(rng: np.random.Generator, scene: Scene) -> str:
    facts = {"circle": "a circle is round.", "square": "a square has four equal sides.",
             "triangle": "a triangle has three sides."}
    options = [
        caption(scene) + ".",
        f"the {scene.colour} {scene.shape} is {scene.size}.",
        f"the {scene.shape} in the {scene.position} is {scene.colour}.",
        f"the background is {scene.background}.",
        facts[scene.shape],
        f"{scene.colour} is a colour.",
        f"there is a {scene.colour} {scene.shape} in the {scene.position}.",
    ]
    k = int(rng.integers(2, 5))
    return " ".join(options[i] for i in sorted(rng.choice(len(options), k, replace=False)))


def all_texts() -> List[str]:
    """Every caption, question, answer and sentence form (the tokenizer's training texts)."""
    from .tokenizer import DEMO_TEXTS

    texts = list(DEMO_TEXTS)
    rng = np.random.default_rng(0)
    for c in PALETTE:
        for s in SHAPES:
            for z in SIZES:
                for p in POSITIONS:
                    for b in BACKGROUNDS:
                        scene = Scene(c, s, z, p, b)
                        texts.append(caption(scene))
                        texts.append(colour_question(s) + " " + c)
                        texts.extend(q + " " + a for q, a in _extra_turns(scene))
                        texts.append(_sentences(rng, scene))
    return texts


def build_tokenizer(out_dir: str) -> str:
    from .tokenizer import build_small_tokenizer

    return build_small_tokenizer(out_dir, all_texts(), vocab_size=TOKENIZER_VOCAB)


def _write_wds(folder: str, prefix: str, scenes: List[Scene], resolution: int, rng) -> List[str]:
    paths = []
    for shard, start in enumerate(range(0, max(len(scenes), 1), SAMPLES_PER_TAR)):
        members = []
        for i in range(start, min(start + SAMPLES_PER_TAR, len(scenes))):
            key = f"{i:06d}"
            members.append((key + ".png", png_bytes(draw(scenes[i], resolution, rng))))
            members.append((key + ".txt", caption(scenes[i]).encode("utf-8")))
        paths.append(write_tar(os.path.join(folder, f"{prefix}-{shard:03d}.tar"), members))
    return paths


def _write_split(folder: str, split: str, n: int, resolution: int, seed: int) -> dict:
    """One split's files; returns the eval items of the held-out split (empty lists for train)."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    held = heldout_combos()
    seen = [t for t in ((c, s, p) for c in PALETTE for s in SHAPES for p in POSITIONS) if t not in held]
    every = seen + held
    gen_triples = seen if split == "train" else held
    und_triples = seen if split == "train" else every

    rng = _rng(seed, split, "gen")
    gen_scenes = sample_scenes(rng, n, gen_triples)
    _write_wds(folder, "gen", gen_scenes, resolution, rng)

    rng = _rng(seed, split, "und")
    _write_wds(folder, "und", sample_scenes(rng, n, und_triples), resolution, rng)

    rng = _rng(seed, split, "qa")
    items, qa_eval = [], []
    for i, scene in enumerate(sample_scenes(rng, n, und_triples)):
        name = f"images/{i:06d}.png"
        with open(os.path.join(folder, name), "wb") as f:
            f.write(png_bytes(draw(scene, resolution, rng)))
        question = colour_question(scene.shape)
        conv = [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": scene.colour}]
        extra = _extra_turns(scene)
        pick = int(rng.integers(2 * len(extra)))  # half the records get a second turn
        if pick < len(extra):
            conv += [{"from": "human", "value": extra[pick][0]}, {"from": "gpt", "value": extra[pick][1]}]
        items.append({"id": f"{split}-{i:06d}", "image": name, "conversations": conv})
        qa_eval.append({"index": i, "image": name, "question": question, "answer": scene.colour,
                        "combo_heldout": is_heldout_combo(*scene.triple)})
    with open(os.path.join(folder, "qa.json"), "w", encoding="utf-8") as f:
        json.dump(items, f, indent=None, separators=(",", ":"))

    rng = _rng(seed, split, "text")
    write_jsonl(os.path.join(folder, "text.jsonl"),
                ({"text": _sentences(rng, s)} for s in sample_scenes(rng, n, und_triples)))

    if split == "train":
        return {}
    gen_eval = [{"index": i, "prompt": caption(s), "colour": s.colour, "shape": s.shape, "size": s.size,
                 "position": s.position, "background": s.background}
                for i, s in enumerate(sample_scenes(_rng(seed, split, "eval"), n, held))]
    return {"generation": gen_eval, "qa": qa_eval}


_OWNED = ("train", "heldout", "tokenizer", "synth.json")


def synthesize(out: str, train: int = 5000, heldout: int = 200, resolution: int = 32, seed: int = 0,
               tokenizer: bool = True, overwrite: bool = False) -> dict:
    """Write the data set under ``out`` (layout in the module docstring); returns ``synth.json``'s content.

    Refuses an ``out`` that already holds any of its files unless ``overwrite`` (then removes them
    first, so no file of a larger earlier run is left behind).
    """
    if train < 1 or heldout < 1:
        raise ValueError("--train and --heldout must be at least 1")
    if resolution < 16:
        raise ValueError("--resolution must be at least 16")
    present = [name for name in _OWNED if os.path.lexists(os.path.join(out, name))]
    if present and not overwrite:
        raise FileExistsError(f"{out} already holds {', '.join(present)} (use --overwrite to replace them)")
    for name in present:
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    os.makedirs(out, exist_ok=True)
    _write_split(os.path.join(out, "train"), "train", train, resolution, seed)
    ev = _write_split(os.path.join(out, "heldout"), "heldout", heldout, resolution, seed)
    palette = {k: list(v) for k, v in PALETTE.items()}
    backgrounds = {k: list(v) for k, v in BACKGROUNDS.items()}
    eval_doc = {"palette": palette, "backgrounds": backgrounds, "chance": 1.0 / len(PALETTE),
                "resolution": resolution, "shapes": list(SHAPES),
                "positions": {name: list(xy) for name, xy in _POSITION_XY.items()}, **ev}
    with open(os.path.join(out, "heldout", "eval.json"), "w", encoding="utf-8") as f:
        json.dump(eval_doc, f, indent=1)
    if tokenizer:
        build_tokenizer(os.path.join(out, "tokenizer"))
    meta = {"seed": seed, "resolution": resolution, "train": train, "heldout": heldout,
            "palette": palette, "backgrounds": backgrounds, "shapes": list(SHAPES), "sizes": list(SIZES),
            "positions": list(POSITIONS), "heldout_combos": [list(t) for t in heldout_combos()],
            "tokenizer": "tokenizer" if tokenizer else None}
    with open(os.path.join(out, "synth.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    return meta


# The layout of recipes/tiny_cpu.yaml (32 px: 16 understanding and 16 generation tokens per image).
TINY_CPU_LAYOUT = ("--resolution", "32", "--und-patch", "8", "--gen-downsample", "4", "--gen-patch", "2",
                   "--seq-length", "256")


def build_command(out: str, split: str = "train", packed: Optional[str] = None) -> List[str]:
    """``python -m data_tools build`` arguments reading one split (inputs and tokenizer; no layout options)."""
    root = os.path.join(out, split)
    return ["build", "--tokenizer", os.path.join(out, "tokenizer"),
            "--out", packed or os.path.join(out, "packed-" + split),
            "--gen-wds", os.path.join(root, "gen-*.tar"), "--und-wds", os.path.join(root, "und-*.tar"),
            "--llava", os.path.join(root, "qa.json"), "--text-jsonl", os.path.join(root, "text.jsonl")]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "synth", help="write a procedurally generated shapes data set (+ tokenizer) in the raw formats",
        description=__doc__.split("\n", 1)[1].replace("```\n", "").replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=int, default=5000, help="samples per training file (gen, und, qa, text)")
    p.add_argument("--heldout", type=int, default=200, help="samples per held-out file and eval list")
    p.add_argument("--resolution", type=int, default=32, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-tokenizer", dest="tokenizer", action="store_false", help="skip the tokenizer")
    p.add_argument("--overwrite", action="store_true", help="replace a previous synth output in --out")


def run(args) -> int:
    try:
        synthesize(args.out, args.train, args.heldout, args.resolution, args.seed, args.tokenizer, args.overwrite)
    except (FileExistsError, ValueError) as e:
        raise SystemExit(f"synth: {e}")
    cmd = build_command(args.out)
    if not args.tokenizer:
        cmd[2] = "TOKENIZER"
    if args.resolution == 32:
        cmd += list(TINY_CPU_LAYOUT)
    else:
        cmd += ["--resolution", str(args.resolution), "LAYOUT-OPTIONS"]
    print(f"wrote {args.out} (train {args.train}, heldout {args.heldout} per file); build with:\n"
          "  python -m data_tools " + " ".join(shlex.quote(c) for c in cmd) + " --image-format png")
    return 0
