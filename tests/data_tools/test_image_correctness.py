"""Images as viewers show them: EXIF orientation, colour spaces, JPEGs without their end marker,
GIF members; and jsonl/JSON files that start with a byte order mark."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from data_tools.cli import main
from datacontract.images import PAD_COLOR, ImageRejected, open_image, prepare_gen_image, prepare_und_image, to_rgb
from data_tools.synthetic import encode, make_image, write_tar
from datacontract.shards import read_manifest

# Transpose that a viewer applies for each EXIF orientation (an independent table, from the spec).
_VIEW = {2: [Image.Transpose.FLIP_LEFT_RIGHT], 3: [Image.Transpose.ROTATE_180], 4: [Image.Transpose.FLIP_TOP_BOTTOM],
         5: [Image.Transpose.TRANSPOSE], 6: [Image.Transpose.ROTATE_270], 7: [Image.Transpose.TRANSVERSE],
         8: [Image.Transpose.ROTATE_90]}


def _with_orientation(displayed: Image.Image, orientation: int, fmt="JPEG") -> bytes:
    """Bytes whose stored pixels, once the EXIF orientation is applied, show ``displayed``."""
    inverse = {Image.Transpose.ROTATE_270: Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_90: Image.Transpose.ROTATE_270}
    stored = displayed
    for t in _VIEW.get(orientation, []):
        stored = stored.transpose(inverse.get(t, t))
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    stored.save(out, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return out.getvalue()


def _portrait():
    """A 60x120 portrait: red top half, blue bottom half."""
    a = np.zeros((120, 60, 3), np.uint8)
    a[:60] = (220, 20, 20)
    a[60:] = (20, 20, 220)
    return Image.fromarray(a)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8, 5, 7, 2, 4])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_understanding_keeps_the_displayed_shape(orientation, fmt):
    data = _with_orientation(_portrait(), orientation, fmt)
    img = open_image(data)
    out = np.asarray(prepare_und_image(img, 32)).astype(int)
    # Displayed 60x120 -> 16x32, centred: columns 0..7 and 24..31 are padding, top red, bottom blue.
    assert (out[:, :7] == PAD_COLOR).all() and (out[:, 25:] == PAD_COLOR).all()
    assert np.abs(out[2:14, 10:22] - (220, 20, 20)).max() < 30
    assert np.abs(out[18:30, 10:22] - (20, 20, 220)).max() < 30


@pytest.mark.parametrize("orientation", [1, 6, 8])
def test_exif_orientation_generation_crops_the_displayed_image(orientation):
    big = _portrait().resize((600, 1200))
    out = np.asarray(prepare_gen_image(open_image(_with_orientation(big, orientation)), 64, seed=5)).astype(int)
    assert out.shape == (64, 64, 3)
    # The square crop of a 64x128 displayed portrait: a red part above a blue part, never sideways.
    top, bottom = out[:4].mean(axis=(0, 1)), out[-4:].mean(axis=(0, 1))
    reds = [c[0] > c[2] for c in (top, bottom)]
    assert reds in ([True, False], [True, True], [False, False])
    left, right = out[:, :4].mean(axis=(0, 1)), out[:, -4:].mean(axis=(0, 1))
    assert np.abs(left - right).max() < 30  # no left/right colour split (that would be a rotated crop)


def test_lab_images_get_their_colours():
    # PIL's 8-bit LAB: L scaled to 0..255, a and b offset by 128. White and CIE red (L 53, a 80, b 67).
    for lab, rgb in (((255, 128, 128), (255, 255, 255)), ((136, 208, 195), (255, 0, 0))):
        src = Image.new("LAB", (16, 16), lab)
        tiff = io.BytesIO()
        src.save(tiff, "TIFF")
        out = to_rgb(Image.open(io.BytesIO(tiff.getvalue())))
        # lcms converts through a D50 Lab profile, sRGB is D65: measured 11 off on the saturated red
        assert np.abs(np.asarray(out)[0, 0].astype(int) - rgb).max() <= 12


def test_jpeg_missing_only_its_end_marker_is_accepted_and_a_cut_one_is_not():
    good = encode(make_image(200, 120, 4))
    assert good.endswith(b"\xff\xd9")
    ref = np.asarray(prepare_und_image(open_image(good), 64)).astype(int)
    out = np.asarray(prepare_und_image(open_image(good[:-2]), 64)).astype(int)
    assert np.abs(out - ref).max() == 0
    for cut in (len(good) // 2, len(good) // 3, len(good) * 3 // 4):
        with pytest.raises(ImageRejected) as e:
            prepare_und_image(open_image(good[:cut]), 64)
        assert e.value.reason == "corrupt_image"


def test_gif_bmp_tiff_members_are_images(tmp_path, tokenizer_dir):
    members = []
    for i, fmt in enumerate(("GIF", "BMP", "TIFF")):
        ext = fmt.lower()
        members += [(f"k{i}.{ext}", encode(make_image(40, 30, i), fmt)), (f"k{i}.txt", f"a {ext} image".encode())]
    write_tar(str(tmp_path / "m.tar"), members)
    out = str(tmp_path / "out")
    assert main(["build", "--tokenizer", tokenizer_dir, "--out", out, "--resolution", "32", "--seq-length", "256",
                 "--workers", "1", "--quiet", "--und-wds", str(tmp_path / "m.tar")]) == 0
    assert read_manifest(out)["totals"]["records_written"] == 3


def test_byte_order_marks_do_not_lose_the_first_record(tmp_path, tokenizer_dir):
    (tmp_path / "t.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"text": "first line"}\n{"text": "second"}\n')
    (tmp_path / "a.jpg").write_bytes(encode(make_image(30, 30, 1)))
    conv = [{"id": "x", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                             {"from": "gpt", "value": "a"}]}]
    (tmp_path / "c.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(conv).encode())
    (tmp_path / "c2.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(conv[0]).encode() + b"\n")
    out = str(tmp_path / "out")
    assert main(["build", "--tokenizer", tokenizer_dir, "--out", out, "--resolution", "32", "--seq-length", "256",
                 "--workers", "1", "--quiet", "--text-jsonl", str(tmp_path / "t.jsonl"),
                 "--llava", str(tmp_path / "c.json"), "--llava", str(tmp_path / "c2.jsonl")]) == 0
    m = read_manifest(out)
    assert m["totals"]["records_written"] == 4 and m["totals"]["records_rejected"] == 0
