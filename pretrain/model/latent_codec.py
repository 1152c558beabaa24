"""Pixels <-> the latent space the flow works in.

``SDXLVAECodec``: the frozen SDXL-VAE (diffusers ``AutoencoderKL``) from a local folder; latents
are the posterior mean, *unscaled* (the trainer multiplies by ``latent_scale``, decode divides).
``SpaceToDepthCodec``: a lossless latent made of the pixels themselves (pixel_unshuffle), so a CPU
run or the demo generates real images without downloaded weights.
Pixels are in [-1, 1], shape [N, 3, R, R].
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .config import ModelConfig


class SpaceToDepthCodec:
    def __init__(self, factor: int) -> None:
        self.factor = factor

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(pixels.float(), self.factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents.float(), self.factor).clamp(-1, 1)


class SDXLVAECodec:
    def __init__(self, path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"init.vae={path}: not a local folder with an AutoencoderKL (config.json + weights)")
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True).to(device).eval()
        self.vae.requires_grad_(False)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode().float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.vae.dtype)).sample.float().clamp(-1, 1)


def build_latent_codec(cfg: ModelConfig, vae_path: str | None = None, device="cpu"):
    """The codec the recipe names; None for SDXL-VAE without a path (latents must be in the shards)."""
    if cfg.gen_vision.latent_codec == "space_to_depth":
        return SpaceToDepthCodec(cfg.und_encoder.image_size // cfg.gen_vision.latent_size)
    return SDXLVAECodec(vae_path, device) if vae_path else None
