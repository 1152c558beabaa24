"""From the flow's latents to images on disk.

A *latent decoder* is any callable: z [B, C, S, S] in the flow's (scaled) latent space -> images
[B, 3, H, W] in [0, 1], float32 on the CPU. Two are provided:

- ``VAEDecoder``: an autoencoder with ``decode`` (the SDXL VAE as a diffusers ``AutoencoderKL``,
  loaded from a local folder by ``load_vae``, or a tiny one built from a config in tests):
  ``vae.decode(z / latent_scale)``, clipped to [-1, 1], mapped to [0, 1];
- ``PixelShuffleDecoder``: latents that are pixels themselves (the ``space_to_depth`` latent of CPU
  recipes: pixel_shuffle undoes it; factor 1 reads the first three channels as RGB).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

LatentDecoder = Callable[[torch.Tensor], torch.Tensor]


def _to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (clipped) -> [0, 1], float32 on the CPU."""
    return ((pixels.float().clamp(-1, 1) + 1) / 2).cpu()


class VAEDecoder:
    """``vae.decode(z / latent_scale)`` -> [0, 1]. ``vae`` returns a tensor or an object with
    ``.sample`` (diffusers); it runs in its own dtype and device."""

    def __init__(self, vae, latent_scale: float) -> None:
        self.vae = vae
        self.latent_scale = latent_scale

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        param = next(self.vae.parameters())
        out = self.vae.decode((z.float() / self.latent_scale).to(param.device, param.dtype))
        return _to_unit(getattr(out, "sample", out))


class PixelShuffleDecoder:
    """Latents made of pixels: pixel_shuffle by ``factor`` of z / latent_scale -> [0, 1]."""

    def __init__(self, factor: int, latent_scale: float = 1.0) -> None:
        self.factor = factor
        self.latent_scale = latent_scale

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        x = z.float() / self.latent_scale
        x = x[:, :3] if self.factor == 1 else F.pixel_shuffle(x, self.factor)
        return _to_unit(x)


def load_vae(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """A diffusers ``AutoencoderKL`` from a local folder (config.json + weights); never the hub."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"--vae {path}: not a local folder with an AutoencoderKL (config.json + weights)")
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
    return vae.to(device).eval().requires_grad_(False)


def build_decoder(cfg, vae_path: str | None = None, device="cpu", dtype=torch.float32) -> LatentDecoder:
    """The decoder for a model config: pixel_shuffle for ``space_to_depth`` latents, else the VAE
    at ``vae_path``."""
    g = cfg.gen_vision
    if getattr(g, "latent_codec", "sdxl_vae") == "space_to_depth":
        return PixelShuffleDecoder(cfg.und_encoder.image_size // g.latent_size, g.latent_scale)
    if vae_path is None:
        raise ValueError("these latents need the VAE: pass --vae (a local AutoencoderKL folder)")
    return VAEDecoder(load_vae(vae_path, device, dtype), g.latent_scale)


def save_png(images: torch.Tensor, paths: Sequence[str | Path]) -> list[Path]:
    """Write [B, 3, H, W] images in [0, 1] as 8-bit RGB PNG files."""
    from PIL import Image

    if len(images) != len(paths):
        raise ValueError(f"{len(images)} images but {len(paths)} paths")
    written = []
    for image, path in zip(images, paths):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(np.ascontiguousarray(array), "RGB").save(path)
        written.append(path)
    return written
