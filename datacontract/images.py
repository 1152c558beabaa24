"""Image decoding and the per-task image rules (JanusFlow paper, section 4.1).

- understanding: resize the long side to the resolution (bicubic, antialiased) and pad to a square,
  centred, with (127, 127, 127);
- generation: resize the short side to the resolution and take a random square crop; the crop is
  drawn from a generator seeded by (seed, record identity), so a re-run gives the same bytes.

Decoding turns every accepted input into 8-bit RGB: EXIF orientation is applied; CMYK, palette,
greyscale, 16-bit and float images are converted (16-bit by scaling 0..65535 to 0..255, not by
clipping); transparency is composited over the padding colour (127, 127, 127) so that a transparent
logo looks the same whether it ends up in an understanding or a generation sample. Anything that
cannot be decoded raises ``ImageRejected`` with a short machine-readable reason.
"""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
from PIL import Image, ImageOps

PAD_COLOR = (127, 127, 127)
DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_DECODED_BYTES = 256 << 20
_JPEG_EOI = b"\xff\xd9"
# Bytes per pixel of the decoded buffer, per PIL mode (what decoding allocates before conversion).
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3,
                    "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4, "I": 4, "F": 4, "I;16": 2, "I;16L": 2, "I;16B": 2,
                    "I;16N": 2}
_ROWS_PER_BAND = 256  # 16-bit and float images are converted in bands of rows (bounded temporaries)


class ImageRejected(Exception):
    """An image that cannot be used; ``reason`` is a short key, ``detail`` says more."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 1) -> Image.Image:
    """Open encoded bytes lazily, with the size checks that must happen before decoding pixels.

    ``max_pixels`` is the limit, whatever PIL's own default (``Image.MAX_IMAGE_PIXELS``) says: PIL's
    limit is set to it while the header is read. Sizes are checked as displayed (EXIF orientation).
    A JPEG that lacks only its end-of-image marker is completed with one.
    """
    if not data:
        raise ImageRejected("empty_file", "zero bytes")
    if data[:2] == b"\xff\xd8" and not data.rstrip(b"\0").endswith(_JPEG_EOI):
        data = data + _JPEG_EOI  # a cut scan is still caught at decode time (see _load)
    saved = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            Image.MAX_IMAGE_PIXELS = max_pixels
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageRejected("decompression_bomb", _scrub(str(e))) from None
        except Exception as e:  # PIL raises many types for garbage input
            raise ImageRejected("corrupt_image", f"{type(e).__name__}: {_scrub(str(e))}") from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    w, h = oriented_size(img)
    if w * h > max_pixels:
        raise ImageRejected("decompression_bomb", f"{w}x{h} exceeds {max_pixels} pixels")
    if min(w, h) < min_side:
        raise ImageRejected("too_small", f"{w}x{h} has a side below {min_side}")
    return img


def _scrub(text: str) -> str:
    """Error text without memory addresses (rejects.jsonl must be the same on every run)."""
    import re

    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)


def oriented_size(img: Image.Image) -> tuple:
    """(width, height) as displayed: EXIF orientations 5-8 swap the stored sides."""
    orientation = _orientation(img)
    w, h = img.size
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _orientation(img: Image.Image) -> int:
    """EXIF orientation (1 = as stored)."""
    if img.format == "PNG" and "exif" not in img.info:
        return 1  # PIL's PNG getexif() decodes every pixel to look for a late eXIf chunk
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:
        return 1


def _is_rotated(img: Image.Image) -> bool:
    return oriented_size(img) != img.size


def to_rgb(img: Image.Image, keep_grey: bool = False) -> Image.Image:
    """Decoded pixels as 8-bit RGB (see the module docstring for the rules); with ``keep_grey`` an
    8-bit greyscale result stays "L" (resize it first, then convert: a third of the memory)."""
    if _orientation(img) != 1:
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:
            pass  # a broken EXIF block is not a reason to drop the pixels
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = _wide_to_l(img)
    elif mode == "LAB":
        from PIL import ImageCms

        transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
        return ImageCms.applyTransform(img, transform)
    elif mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "1":
        img = img.convert("L")
    mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, PAD_COLOR + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "L" and keep_grey:
        return img
    if mode != "RGB":
        img = img.convert("RGB")
    return img


def _wide_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8-bit "L" by scaling (not clipping), in row bands so
    the temporaries stay small whatever the image size."""
    w, h = img.size
    mode = img.mode
    out = np.empty((h, w), dtype=np.uint8)
    if mode.startswith("I;16"):
        peak = 65535.0
    else:
        top = max(float(np.asarray(img.crop((0, y, w, min(h, y + _ROWS_PER_BAND)))).max(initial=0))
                  for y in range(0, h, _ROWS_PER_BAND)) if h else 0.0
        peak = (1.0 if top <= 1.0 else 255.0) if mode == "F" else (65535.0 if top > 255 else 255.0)
    for y in range(0, h, _ROWS_PER_BAND):
        band = np.asarray(img.crop((0, y, w, min(h, y + _ROWS_PER_BAND))), dtype=np.float32)
        out[y : y + band.shape[0]] = np.clip(np.rint(band * np.float32(255.0 / peak)), 0, 255)
    return Image.fromarray(out, "L")


def _decode(img: Image.Image, draft_size=None, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> Image.Image:
    """Pixels as 8-bit RGB, oriented. ``draft_size`` is in displayed (oriented) pixels."""
    if draft_size is not None and img.format == "JPEG":
        # Decode a JPEG at a reduced scale in the DCT domain when it is at least twice the target:
        # much faster, and the final bicubic resize still sets the exact size.
        if _is_rotated(img):
            draft_size = draft_size[::-1]
        img.draft("RGB", draft_size)
    w, h = img.size
    decoded = w * h * _BYTES_PER_PIXEL.get(img.mode, 8)
    if decoded > max_decoded_bytes:
        raise ImageRejected("decompression_bomb", f"{w}x{h} {img.mode} decodes to {decoded} bytes "
                            f"(limit {max_decoded_bytes})")
    try:
        img.load()
    except Exception as e:
        raise ImageRejected("corrupt_image", f"{type(e).__name__}: {_scrub(str(e))}") from None
    if img.format == "JPEG" and img.mode in ("RGB", "L") and _scan_was_cut(img):
        raise ImageRejected("corrupt_image", "JPEG scan data is cut short (the bottom rows are missing)")
    try:
        return to_rgb(img, keep_grey=True)
    except Exception as e:
        raise ImageRejected("unsupported_image", f"mode {img.mode}: {type(e).__name__}: {_scrub(str(e))}") from None


def _scan_was_cut(img: Image.Image) -> bool:
    """libjpeg fills the blocks after a premature end of scan data with flat mid-grey: a JPEG whose
    whole last block row is exactly 128 was cut (a real photo never is, to the last bit)."""
    w, h = img.size
    rows = np.asarray(img.crop((0, max(0, h - 8), w, h)))
    return h >= 16 and bool((rows == 128).all())


def prepare_und_image(img: Image.Image, resolution: int,
                      max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> Image.Image:
    """Long side to ``resolution`` (bicubic), centred on a (127,127,127) square canvas."""
    w, h = oriented_size(img)
    scale = resolution / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    rgb = _decode(img, (max(nw, 1), max(nh, 1)) if scale <= 0.5 else None, max_decoded_bytes)
    if rgb.size != (nw, nh):
        # reducing_gap: a box reduction first when shrinking by more than 3x (PIL's own speed-up;
        # the bicubic pass then works on at most 3x the target size).
        rgb = rgb.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
    rgb = rgb.convert("RGB")
    if (nw, nh) == (resolution, resolution):
        return rgb
    canvas = Image.new("RGB", (resolution, resolution), PAD_COLOR)
    canvas.paste(rgb, ((resolution - nw) // 2, (resolution - nh) // 2))
    return canvas


def crop_seed(seed: int, identity: str) -> int:
    """A 64-bit seed from the build seed and a record identity (stable across runs and machines)."""
    digest = hashlib.sha256(f"{seed}\x00{identity}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


def prepare_gen_image(img: Image.Image, resolution: int, seed: int,
                      max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> Image.Image:
    """Short side to ``resolution`` (bicubic), then a random square crop drawn from ``seed``.

    The crop offset is drawn in the resized image's pixel grid, then mapped back to the source so
    a single resize of the cropped box does the work.
    """
    w, h = oriented_size(img)
    short = min(w, h)
    scale = resolution / short
    rw, rh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    rng = np.random.default_rng(seed)
    off_x = int(rng.integers(0, rw - resolution + 1))
    off_y = int(rng.integers(0, rh - resolution + 1))
    draft = (max(resolution, round(w * scale)), max(resolution, round(h * scale))) if scale <= 0.5 else None
    rgb = _decode(img, draft, max_decoded_bytes)
    # Box in the decoded image's coordinates (a JPEG draft may have shrunk it by a power of two).
    sx, sy = rgb.size[0] / rw, rgb.size[1] / rh
    box = (off_x * sx, off_y * sy, (off_x + resolution) * sx, (off_y + resolution) * sy)
    return rgb.resize((resolution, resolution), Image.BICUBIC, box=box, reducing_gap=3.0).convert("RGB")


def encode_image(img: Image.Image, fmt: str = "jpeg", quality: int = 95) -> bytes:
    """Encode a prepared RGB image for storage (JPEG without chroma subsampling, or PNG)."""
    out = io.BytesIO()
    if fmt == "jpeg":
        img.save(out, "JPEG", quality=quality, subsampling=0)
    elif fmt == "png":
        img.save(out, "PNG", compress_level=1)
    else:
        raise ValueError(f"unknown image format {fmt!r}: use 'jpeg' or 'png'")
    return out.getvalue()
