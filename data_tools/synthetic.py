"""Small synthetic raw datasets in every input format (tests, benchmarks, the demo).

Everything is generated from a seed; nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
from PIL import Image

WORDS = ("a photo of the red blue green cat dog car tree house on in with small large bright dark "
         "sitting running next to under near wooden table sky water beach park street city").split()


def make_image(width: int, height: int, seed: int) -> Image.Image:
    """A smooth colour gradient with some noise (compresses like a photo, not like a flat fill)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, 3)
    slope = rng.uniform(-2, 2, (2, 3)) * (200.0 / max(width, height))
    img = base + xs[..., None] * slope[0] + ys[..., None] * slope[1]
    img = img + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **({"quality": 90} if fmt == "JPEG" and not kw else kw))
    return out.getvalue()


def make_caption(rng: np.random.Generator, lo: int = 3, hi: int = 12) -> str:
    return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi + 1))))


def write_tar(path: str, members: Iterable[Tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tf.addfile(info, io.BytesIO(data))
    return path


def write_parquet(path: str, images: List[Optional[bytes]], captions: List, image_column: str = "image",
                  caption_column: str = "caption", row_group_size: int = 64) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cap_type = pa.binary() if any(isinstance(c, bytes) for c in captions) else pa.string()
    table = pa.table({image_column: pa.array(images, pa.binary()), caption_column: pa.array(captions, cap_type)})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_jsonl(path: str, objs: Iterable) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for obj in objs:
            f.write((obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)) + "\n")
    return path


def make_corpus(root: str, n_und: int = 6, n_gen: int = 6, n_llava: int = 4, n_text: int = 6, seed: int = 0,
                size_range: Tuple[int, int] = (40, 100), text_words: Tuple[int, int] = (5, 60)) -> Dict[str, str]:
    """One clean file per input kind under ``root``; returns {kind: path} (kinds as the CLI flags)."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)

    def image() -> bytes:
        w, h = (int(x) for x in rng.integers(size_range[0], size_range[1] + 1, 2))
        return encode(make_image(w, h, int(rng.integers(1 << 30))))

    members = []
    for i in range(n_und):
        members += [(f"und{i:04d}.jpg", image()), (f"und{i:04d}.txt", make_caption(rng).encode())]
    paths = {"und_wds": write_tar(os.path.join(root, "und-000.tar"), members)}
    members = []
    for i in range(n_gen):
        cap = json.dumps({"caption": make_caption(rng)}).encode()
        members += [(f"gen{i:04d}.png", encode(make_image(60, 44, i), "PNG")), (f"gen{i:04d}.json", cap)]
    paths["gen_wds"] = write_tar(os.path.join(root, "gen-000.tar"), members)
    paths["gen_parquet"] = write_parquet(
        os.path.join(root, "gen-000.parquet"), [image() for _ in range(n_gen)],
        [make_caption(rng) for _ in range(n_gen)])
    img_dir = os.path.join(root, "llava_images")
    os.makedirs(img_dir, exist_ok=True)
    items = []
    for i in range(n_llava):
        name = f"img{i:03d}.jpg"
        with open(os.path.join(img_dir, name), "wb") as f:
            f.write(image())
        conv = [{"from": "human", "value": f"<image>\n{make_caption(rng)}?"},
                {"from": "gpt", "value": make_caption(rng, 5, 20)}]
        if i % 2:
            conv += [{"from": "human", "value": make_caption(rng)}, {"from": "gpt", "value": make_caption(rng)}]
        items.append({"id": f"c{i}", "image": name, "conversations": conv})
    path = os.path.join(root, "llava.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(items, f)
    paths["llava"] = path
    paths["llava_image_root"] = img_dir
    paths["text_jsonl"] = write_jsonl(
        os.path.join(root, "text.jsonl"),
        [{"text": make_caption(rng, *text_words)} for _ in range(n_text)])
    return paths


def tiny_tokenizer(out_dir: str) -> str:
    """The small byte-level BPE tokenizer the tests and demos use (built offline, saved to out_dir)."""
    from .tokenizer import DEMO_TEXTS, build_small_tokenizer

    return build_small_tokenizer(out_dir, list(DEMO_TEXTS) + [" ".join(WORDS)], vocab_size=400)


def tiny_build_args(paths: Dict[str, str], tokenizer: str, out: str, *extra: str) -> List[str]:
    """``build`` arguments for a corpus from ``make_corpus``: resolution 32 (4 und + 4 gen tokens)."""
    args = ["build", "--tokenizer", tokenizer, "--out", out, "--resolution", "32", "--seq-length", "256",
            "--workers", "1", "--quiet"]
    for kind in ("und_wds", "gen_wds", "gen_parquet", "llava", "text_jsonl"):
        if kind in paths:
            args += ["--" + kind.replace("_", "-"), paths[kind]]
    if "llava_image_root" in paths:
        args += ["--llava-image-root", paths["llava_image_root"]]
    return args + list(extra)
