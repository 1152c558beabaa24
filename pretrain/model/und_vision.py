"""Understanding encoder: SigLIP vision tower from transformers, output after its final LayerNorm.

Built from a config (never downloaded). Pixels arrive already normalised to [-1, 1]; the tower does
not normalise them again (as the released model). No pooling head: JanusFlow uses every patch token.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from .config import UnderstandingEncoderConfig


def build_siglip_config(cfg: UnderstandingEncoderConfig) -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_channels=3,
        layer_norm_eps=cfg.layer_norm_eps,
        hidden_act="gelu",  # exact (erf) GELU, as the released timm tower; HF's default is tanh
        vision_use_head=False,
        attn_implementation="sdpa",
    )


class UnderstandingEncoder(nn.Module):
    """[N, 3, R, R] pixels in [-1, 1] -> [N, (R/patch)^2, width] patch features."""

    def __init__(self, cfg: UnderstandingEncoderConfig) -> None:
        super().__init__()
        self.tower = SiglipVisionModel(build_siglip_config(cfg))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = self.tower.embeddings.patch_embedding.weight.dtype
        return self.tower(pixel_values=pixels.to(dtype)).last_hidden_state


class RepaProjector(nn.Module):
    """h_phi of the paper: three linear layers with SiLU between, LLM width -> SigLIP width."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
