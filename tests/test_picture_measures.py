"""pretrain.picture_measures on hand-made images: dominant colour, shape, position and border
cleanliness of one picture. tests/test_evaluate.py draws its held-out images with this file's helpers."""

import numpy as np
import pytest
from PIL import Image

from pretrain.picture_measures import (border_error, classify_position, classify_shape, dominant_colour,
                                       estimate_background, generation_colour_accuracy, shape_region)

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


# ------------------------------------------------------------------ shape, position, cleanliness


POSITIONS = {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
             "bottom right": (0.75, 0.75), "centre": (0.5, 0.5)}


def _drawn(shape, box, size=32, colour=(255, 0, 0), bg=(0, 0, 0)):
    """A shape drawn by hand with PIL (no data_tools code): box = (x0, y0, x1, y1), pixels inclusive."""
    from PIL import ImageDraw

    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = box
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    else:
        d.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=colour)
    return np.array(img)


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
@pytest.mark.parametrize("box", [(3, 3, 9, 9), (18, 4, 29, 15), (9, 9, 22, 22), (4, 20, 11, 27)])
def test_shape_of_drawn_shapes_small_and_large(shape, box):
    region = shape_region(_drawn(shape, box), PALETTE)
    assert classify_shape(region) == shape


def test_shape_survives_noise_blur_and_a_stray_blob():
    from PIL import ImageFilter

    rng = np.random.default_rng(0)
    for shape in ("circle", "square", "triangle"):
        img = _drawn(shape, (8, 8, 23, 23), bg=(100, 100, 100))
        blurred = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(0.7)))
        noisy = np.clip(blurred + rng.normal(0, 25, img.shape), 0, 255).astype(np.uint8)
        noisy[1:3, 28:30] = (255, 0, 0)  # a stray 2x2 blob of the same colour: not the largest region
        region = shape_region(noisy, PALETTE)
        assert not region[1:3, 28:30].any()
        assert classify_shape(region) == shape


def _flood_fill_largest(mask):
    """Reference: a pixel-by-pixel 8-connected flood fill in reading order, first region on ties."""
    h, w = mask.shape
    seen, best = np.zeros_like(mask), np.zeros_like(mask)
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        region, stack = np.zeros_like(mask), [(y0, x0)]
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            region[y, x] = True
            for ny in range(max(y - 1, 0), min(y + 2, h)):
                for nx in range(max(x - 1, 0), min(x + 2, w)):
                    if mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        if region.sum() > best.sum():
            best = region
    return best


def test_largest_region_matches_a_flood_fill():
    from pretrain.picture_measures import _largest_component

    rng = np.random.default_rng(0)
    masks = [rng.random((h, w)) < p for h, w, p in [(1, 1, 0.5), (1, 17, 0.5), (23, 1, 0.6), (9, 9, 0.3),
                                                       (31, 40, 0.45), (40, 31, 0.55), (64, 64, 0.4)] for _ in range(6)]
    diagonal = np.eye(12, dtype=bool)  # one region through corners only (8-connected)
    ties = np.zeros((6, 9), bool)
    ties[4:6, 0:2] = ties[0:2, 7:9] = True  # two regions of 4 pixels: the first in reading order wins
    masks += [diagonal, diagonal[::-1], ties, np.zeros((5, 5), bool), np.ones((7, 3), bool)]
    for mask in masks:
        assert np.array_equal(_largest_component(mask), _flood_fill_largest(mask)), mask.astype(int)
    assert _largest_component(ties)[0, 7]


def test_position_is_the_nearest_centre_of_the_region():
    expected = {(2, 2, 10, 10): "top left", (21, 3, 29, 11): "top right", (3, 22, 11, 30): "bottom left",
                (20, 20, 28, 28): "bottom right", (12, 12, 20, 20): "centre"}
    for box, where in expected.items():
        region = shape_region(_drawn("square", box), PALETTE)
        assert classify_position(region, POSITIONS) == where
    # the centroid decides, not the bounding box: a triangle's mass sits low
    region = np.zeros((32, 32), bool)
    region[16, 16] = True
    assert classify_position(region, POSITIONS) == "centre"
    assert shape_region(_image((30, 30, 30)), PALETTE) is None


def test_border_error_against_the_prompt_background():
    img = _drawn("square", (10, 10, 20, 20), bg=(100, 100, 100))
    assert border_error(img, (100, 100, 100)) == 0.0
    assert border_error(img, (0, 0, 0)) == pytest.approx(100.0)
    img[0, :] = (130, 100, 70)  # one noisy row of 32 of the 124 border pixels: |30| + 0 + |-30| per pixel
    assert border_error(img, (100, 100, 100)) == pytest.approx(32 * 60 / (124 * 3))
