"""Measures of one generated picture against its prompt, as a person would judge it: which palette
colour it shows, the shape and position of that colour's largest region, and how clean its border is
(``generation_colour_accuracy``: the colour measure over a list of pictures).

Pictures are arrays, never files: [H, W, 3] (or [H, W] grey, or [H, W, 4] with alpha composited onto
black) uint8 in 0..255 or float in 0..1. A palette is {name: (r, g, b)} in 0..255; a background is
(r, g, b) in 0..255; positions are {name: (x, y)} as fractions of the side, 0 = left/top. Reading the
held-out set and the model's files, and the report over them, are ``pretrain.evaluate``'s; no model
code here either.
"""

from __future__ import annotations

from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np

Palette = Mapping[str, Sequence[float]]


def _as_rgb_255(image) -> np.ndarray:
    """[H, W, 3] (or [H, W] / [H, W, 4]) uint8 in 0..255 or float in 0..1 -> float64 [H, W, 3] in 0..255.

    An alpha channel is composited onto black: a transparent pixel shows no colour, as on a viewer
    with no backdrop. (Not onto the prompt's background: that would hand a blank transparent image
    a clean border for free.)"""
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"expected an [H, W, 3] image, got shape {a.shape}")
    if np.issubdtype(a.dtype, np.floating):
        a = np.clip(a.astype(np.float64), 0.0, 1.0) * 255.0
    else:
        a = a.astype(np.float64)
    return a[..., :3] * (a[..., 3:] / 255.0) if a.shape[-1] == 4 else a


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
    # one centre at a time: an [H, W, K, 3] distance array costs K times the image's memory
    nearest, best = np.zeros(a.shape[:2], np.intp), ((a - centres[0]) ** 2).sum(-1)
    for k in range(1, len(centres)):
        dist = ((a - centres[k]) ** 2).sum(-1)
        closer = dist < best  # strictly: a tie keeps the earlier centre (the background first)
        nearest[closer], best[closer] = k, dist[closer]
    return nearest, names


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
    """The largest 8-connected region of a boolean [H, W] mask (on ties, the one whose first pixel
    comes first in reading order).

    Works on horizontal runs of the mask, not pixels: a run touches a run of the row above when their
    columns overlap or meet at a corner, and runs are joined by union-find. A filled 1024 x 1024
    frame is 1,024 runs, where a pixel-by-pixel flood fill took seconds in Python."""
    h, w = mask.shape
    stride = w + 2  # each row framed by a False column on both sides, so no run crosses rows
    framed = np.zeros((h, stride), np.int8)
    framed[:, 1:-1] = mask
    steps = np.diff(framed.ravel())
    first = np.flatnonzero(steps == 1) + 1  # flat index of each run's first pixel, in reading order
    last = np.flatnonzero(steps == -1)  # and of its last pixel
    if not len(first):
        return np.zeros(mask.shape, dtype=bool)
    # Runs of the row above that touch run b: last >= first_b - stride - 1 and first <= last_b - stride + 1,
    # a contiguous range [lo, hi) of the sorted runs (both bounds stay inside the row above).
    lo = np.searchsorted(last, first - stride - 1, side="left")
    hi = np.searchsorted(first, last - stride + 1, side="right")
    parent = list(range(len(first)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for b in np.flatnonzero(hi > lo).tolist():
        rb = root(b)
        for a in range(int(lo[b]), int(hi[b])):
            ra = root(a)
            if ra != rb:  # the smaller index becomes the root: a region is named by its first run
                ra, rb = min(ra, rb), max(ra, rb)
                parent[rb] = ra
                rb = ra
    roots = np.array([root(i) for i in range(len(first))])
    sizes = np.bincount(roots, weights=last - first + 1)
    best = int(np.argmax(sizes))  # argmax takes the first maximum: the region whose first run is first
    chosen = roots == best
    edges = np.zeros(framed.size + 1, np.int32)
    np.add.at(edges, first[chosen], 1)
    np.add.at(edges, last[chosen] + 1, -1)
    return (np.cumsum(edges[:-1]) > 0).reshape(h, stride)[:, 1:-1]


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
