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


class ImageRejected(Exception):
    """An image that cannot be used; ``reason`` is a short key, ``detail`` says more."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 1) -> Image.Image:
    """Open encoded bytes lazily, with the size checks that must happen before decoding pixels."""
    if not data:
        raise ImageRejected("empty_file", "zero bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageRejected("decompression_bomb", str(e)) from None
        except Exception as e:  # PIL raises many types for garbage input
            raise ImageRejected("corrupt_image", f"{type(e).__name__}: {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageRejected("decompression_bomb", f"{w}x{h} exceeds {max_pixels} pixels")
    if min(w, h) < min_side:
        raise ImageRejected("too_small", f"{w}x{h} has a side below {min_side}")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Decoded pixels as 8-bit RGB (see the module docstring for the rules)."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:
        pass  # a broken EXIF block is not a reason to drop the pixels
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit PNG/TIFF greyscale arrives as "I;16" or "I" (values 0..65535).
        peak = 65535.0 if (mode.startswith("I;16") or arr.max(initial=0) > 255) else 255.0
        arr = np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "L")
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        peak = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        img = Image.fromarray(np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8), "L")
    elif mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "1":
        img = img.convert("L")
    mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, PAD_COLOR + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        img = img.convert("RGB")
    return img


def _decode(img: Image.Image, draft_size=None) -> Image.Image:
    if draft_size is not None and img.format == "JPEG":
        # Decode a JPEG at a reduced scale in the DCT domain when it is at least twice the target:
        # much faster, and the final bicubic resize still sets the exact size.
        img.draft("RGB", draft_size)
    try:
        img.load()
    except Exception as e:
        raise ImageRejected("corrupt_image", f"{type(e).__name__}: {e}") from None
    try:
        return to_rgb(img)
    except Exception as e:
        raise ImageRejected("unsupported_image", f"mode {img.mode}: {type(e).__name__}: {e}") from None


def prepare_und_image(img: Image.Image, resolution: int) -> Image.Image:
    """Long side to ``resolution`` (bicubic), centred on a (127,127,127) square canvas."""
    w, h = img.size
    scale = resolution / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    rgb = _decode(img, (max(nw, 1), max(nh, 1)) if scale <= 0.5 else None)
    if rgb.size != (nw, nh):
        rgb = rgb.resize((nw, nh), Image.BICUBIC)
    if (nw, nh) == (resolution, resolution):
        return rgb
    canvas = Image.new("RGB", (resolution, resolution), PAD_COLOR)
    canvas.paste(rgb, ((resolution - nw) // 2, (resolution - nh) // 2))
    return canvas


def crop_seed(seed: int, identity: str) -> int:
    """A 64-bit seed from the build seed and a record identity (stable across runs and machines)."""
    digest = hashlib.sha256(f"{seed}\x00{identity}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


def prepare_gen_image(img: Image.Image, resolution: int, seed: int) -> Image.Image:
    """Short side to ``resolution`` (bicubic), then a random square crop drawn from ``seed``.

    The crop offset is drawn in the resized image's pixel grid, then mapped back to the source so
    a single resize of the cropped box does the work.
    """
    w, h = img.size
    short = min(w, h)
    scale = resolution / short
    rw, rh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    rng = np.random.default_rng(seed)
    off_x = int(rng.integers(0, rw - resolution + 1))
    off_y = int(rng.integers(0, rh - resolution + 1))
    draft = (max(resolution, round(w * scale)), max(resolution, round(h * scale))) if scale <= 0.5 else None
    rgb = _decode(img, draft)
    # Box in the decoded image's coordinates (a JPEG draft may have shrunk it by a power of two).
    sx, sy = rgb.size[0] / rw, rgb.size[1] / rh
    box = (off_x * sx, off_y * sy, (off_x + resolution) * sx, (off_y + resolution) * sy)
    return rgb.resize((resolution, resolution), Image.BICUBIC, box=box)


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
