"""From the flow's latents to images on disk.

A *latent decoder* is any callable: z [B, C, S, S] in the flow's (scaled) latent space -> images
[B, 3, H, W] in [0, 1], float32 on the CPU. ``CodecDecoder`` makes one from a latent codec of
``pretrain.model.latent_codec`` (the SDXL VAE from a local folder, or the pixel-space
``space_to_depth`` latent of CPU recipes), or from anything with ``decode(latents) -> [-1, 1]``
(a tiny AutoencoderKL in tests): ``codec.decode(z / latent_scale)``, clipped, mapped to [0, 1].
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

LatentDecoder = Callable[[torch.Tensor], torch.Tensor]


class CodecDecoder:
    """``codec.decode(z / latent_scale)`` in [-1, 1] -> [0, 1]. The training side multiplies the
    codec's latents by ``latent_scale`` (0.13025 for the SDXL VAE), so decoding divides."""

    def __init__(self, codec, latent_scale: float) -> None:
        self.codec = codec
        self.latent_scale = latent_scale

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        out = self.codec.decode(z.float() / self.latent_scale)
        out = getattr(out, "sample", out)  # a bare diffusers AutoencoderKL returns DecoderOutput
        return ((out.float().clamp(-1, 1) + 1) / 2).cpu()


def build_decoder(cfg, vae_path: str | None = None, device="cpu") -> LatentDecoder:
    """The decoder for a model config: the codec it names (``model.gen_vision.latent_codec``)."""
    from ..model.latent_codec import build_latent_codec

    codec = build_latent_codec(cfg, vae_path, device)
    if codec is None:
        raise ValueError("these latents need the VAE to become images: pass --vae (a local AutoencoderKL folder)")
    return CodecDecoder(codec, cfg.gen_vision.latent_scale)


class NonFiniteError(ValueError):
    """Sampled latents or decoded images holding NaN or inf. Converted to uint8 they would silently
    become black (NaN -> 0) or saturated pixels, so they are never written as images."""


def require_finite(tensor: torch.Tensor, what: str, hint: str = "") -> None:
    """Raise ``NonFiniteError`` (saying ``what``, then ``hint``) when a floating tensor holds NaN or inf."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        then = f": {hint}" if hint else ""
        raise NonFiniteError(f"{what} hold NaN or inf values; nothing was written for them{then}")


def check_output_folder(out: str | Path, files: Sequence[str | Path] = ()) -> None:
    """Refuse, before any sampling work, an output folder that cannot be made or written, and
    output ``files`` (paths inside it) that a folder stands in the way of. Creates nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: an existing file; the images are written into a folder")
    from ..convert.state import creatable_folder

    existing = creatable_folder(out, out)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {existing} is not writable")
    for file in map(Path, files):
        if file.is_dir():
            raise ValueError(f"--out {out}: {file} is a folder, so that output cannot be written; "
                             "remove it or choose another --out")


def save_png(images: torch.Tensor, paths: Sequence[str | Path]) -> list[Path]:
    """Write [B, 3, H, W] images in [0, 1] as 8-bit RGB PNG files; images holding NaN or inf raise
    ``NonFiniteError`` before any file is written."""
    from PIL import Image

    if len(images) != len(paths):
        raise ValueError(f"{len(images)} images but {len(paths)} paths")
    require_finite(images, f"the decoded images for {', '.join(str(p) for p in paths)}",
                   "the latent decoder's weights (--vae) may be damaged")
    written = []
    for image, path in zip(images, paths):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        # Under a temporary name first: a full disk or a kill mid-write leaves no truncated PNG that
        # looks like a picture (an earlier one of that name stays).
        partial = path.with_name(f".{path.name}.partial")
        try:
            Image.fromarray(np.ascontiguousarray(array), "RGB").save(partial, format="PNG")
            os.replace(partial, path)
        except OSError as err:  # said of the file asked for, not of its temporary name
            raise OSError(err.errno, err.strerror, str(path)) from None
        finally:
            partial.unlink(missing_ok=True)
        written.append(path)
    return written
