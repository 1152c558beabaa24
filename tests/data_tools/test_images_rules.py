"""The per-task image rules and the decoding of awkward image files."""

import io

import numpy as np
import pytest
from PIL import Image

from datacontract.images import (
    PAD_COLOR,
    ImageRejected,
    crop_seed,
    encode_image,
    open_image,
    prepare_gen_image,
    prepare_und_image,
    to_rgb,
)
from data_tools.synthetic import encode, make_image


def _png(img, **kw):
    out = io.BytesIO()
    img.save(out, "PNG", **kw)
    return out.getvalue()


def test_understanding_resizes_long_side_and_pads_centred_with_grey():
    src = Image.new("RGB", (100, 50), (200, 10, 10))
    out = np.asarray(prepare_und_image(open_image(_png(src)), 32))
    assert out.shape == (32, 32, 3)
    # 100x50 -> 32x16, centred: rows 8..23 are the image, the rest is padding.
    assert (out[:8] == PAD_COLOR).all() and (out[24:] == PAD_COLOR).all()
    assert np.abs(out[9:23].astype(int) - (200, 10, 10)).max() <= 2


def test_understanding_portrait_pads_left_and_right():
    out = np.asarray(prepare_und_image(open_image(_png(Image.new("RGB", (30, 90), (0, 0, 255)))), 30))
    assert (out[:, :10] == PAD_COLOR).all() and (out[:, 20:] == PAD_COLOR).all()
    assert (out[:, 11:19, 2] > 250).all()


def test_generation_resizes_short_side_and_crops_a_seeded_square():
    # A horizontal ramp: the crop offset shows in the first pixel's value.
    ramp = np.tile(np.linspace(0, 255, 300).astype(np.uint8)[None, :, None], (100, 1, 3))
    data = _png(Image.fromarray(ramp))
    crops = [np.asarray(prepare_gen_image(open_image(data), 32, crop_seed(0, f"k{i}"))) for i in range(8)]
    assert all(c.shape == (32, 32, 3) for c in crops)
    assert not any((c == PAD_COLOR).all(axis=-1).all(axis=0).any() for c in crops[:1])  # no padding
    firsts = {int(c[0, 0, 0]) for c in crops}
    assert len(firsts) > 1, "different records should get different crops"
    again = np.asarray(prepare_gen_image(open_image(data), 32, crop_seed(0, "k3")))
    assert (again == crops[3]).all(), "the same seed and key give the same crop"
    # The crop covers the full short side: top and bottom rows come from the image, not padding.
    assert crops[0].std() > 0


def test_crop_seed_depends_on_seed_and_identity():
    assert crop_seed(0, "a") == crop_seed(0, "a")
    assert len({crop_seed(0, "a"), crop_seed(1, "a"), crop_seed(0, "b")}) == 3


def test_large_jpeg_uses_reduced_decode_and_still_gets_exact_size():
    data = encode(make_image(800, 600, 1))
    assert prepare_und_image(open_image(data), 32).size == (32, 32)
    assert prepare_gen_image(open_image(data), 32, 5).size == (32, 32)


@pytest.mark.parametrize("mode", ["CMYK", "P", "L", "1", "LA", "RGBA", "I;16", "I", "F"])
def test_unusual_modes_become_8bit_rgb(mode):
    base = make_image(40, 30, 2)
    if mode == "I;16":
        img = Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257)
    elif mode == "RGBA":
        img = base.convert("RGBA")
        img.putalpha(0)
    else:
        img = base.convert(mode)
    rgb = to_rgb(img)
    assert rgb.mode == "RGB" and rgb.size == (40, 30)
    if mode == "I;16":
        # 16-bit values are scaled, not clipped to white.
        ref = np.asarray(base.convert("L")).astype(int)
        assert np.abs(np.asarray(rgb)[..., 0].astype(int) - ref).max() <= 1
    if mode == "RGBA":
        assert (np.asarray(rgb) == PAD_COLOR).all(), "fully transparent composites to the pad colour"


def test_palette_with_transparency_and_16bit_png_file_round_trip():
    img = make_image(40, 30, 3).convert("P")
    img.info["transparency"] = 0
    assert prepare_und_image(open_image(_png(img, transparency=0)), 32).mode == "RGB"
    arr16 = (np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50)
    data = _png(Image.fromarray(arr16))
    out = np.asarray(prepare_und_image(open_image(data), 40))
    assert out.max() > 200, "16-bit content keeps its range"


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty_file"),
        (b"not an image at all", "corrupt_image"),
        (encode(make_image(64, 64, 4))[:200], "corrupt_image"),
    ],
)
def test_bad_bytes_are_rejected_with_a_reason(data, reason):
    with pytest.raises(ImageRejected) as e:
        prepare_und_image(open_image(data), 32)
    assert e.value.reason == reason


def test_decompression_bomb_is_rejected_before_decoding():
    data = _png(Image.new("L", (4000, 4000)))
    with pytest.raises(ImageRejected) as e:
        open_image(data, max_pixels=1_000_000)
    assert e.value.reason == "decompression_bomb"


def test_encode_formats():
    img = make_image(32, 32, 5)
    assert Image.open(io.BytesIO(encode_image(img, "png"))).format == "PNG"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_image(img, "png")))), np.asarray(img))
    assert Image.open(io.BytesIO(encode_image(img, "jpeg"))).format == "JPEG"
