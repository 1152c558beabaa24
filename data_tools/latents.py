"""Offline VAE encoding of generation images (diffusers ``AutoencoderKL`` from a local path).

Stored value: the mean of the VAE posterior (``latent_dist.mode()``), *unscaled*; the model
multiplies by its ``latent_scale`` (0.13025 for SDXL) before the flow sees it. Stored as raw
little-endian float16 or bfloat16 (``datacontract.shards.encode_latent``).

Runs on a GPU when there is one (``device="auto"``). The SDXL VAE overflows in float16, so the
encoder computes in float32 (or bfloat16 on a GPU, by option) and only the stored copy is 16-bit.
Determinism across machines is only as good as the kernels; on one machine and device a re-run
gives the same bytes.
"""

from __future__ import annotations

import os
from typing import List

import numpy as np

from datacontract.shards import encode_latent


class VaeEncoder:
    def __init__(self, path: str, device: str = "auto", compute_dtype: str = "float32",
                 store_dtype: str = "float16", batch_size: int = 16) -> None:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"VAE path {path!r} is not a local directory")
        import torch
        from diffusers import AutoencoderKL

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.torch = torch
        self.device = torch.device(device)
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[compute_dtype]
        self.store_dtype = store_dtype
        self.batch_size = batch_size
        self.vae = AutoencoderKL.from_pretrained(path, local_files_only=True).to(self.device, self.dtype).eval()

    def latent_shape(self, resolution: int) -> tuple:
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (int(self.vae.config.latent_channels), resolution // factor, resolution // factor)

    def encode(self, images: List[np.ndarray]) -> List[bytes]:
        """uint8 [R, R, 3] images -> stored latent bytes, one per image, batched."""
        torch = self.torch
        out: List[bytes] = []
        for i in range(0, len(images), self.batch_size):
            batch = np.stack(images[i : i + self.batch_size])
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(self.device, torch.float32)
            x = (x / 255.0 - 0.5) / 0.5
            with torch.no_grad():
                z = self.vae.encode(x.to(self.dtype)).latent_dist.mode().float().cpu().numpy()
            out.extend(encode_latent(zi, self.store_dtype) for zi in z)
        return out
