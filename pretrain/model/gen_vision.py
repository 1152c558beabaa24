"""Generation path around the VAE latent: time embedding, ConvNeXt-V2 blocks, encoder and decoder.

Layout and numerics follow the released JanusFlow-1.3B (``released_checkpoint.md``): attribute names
here are the state-dict names of the released ``vision_gen_enc_model`` / ``vision_gen_dec_model``
so the converter only renames prefixes. Time convention: t in [0, 1], t = 0 is noise, t = 1 is data;
callers pass t in [0, 1] and the 1000x scaling happens here, in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fused_kernels.dispatch import use_triton

from .config import GenerationVisionConfig


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, computed in float32 (as the released modules do)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(dtype)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN on channels-last input [B, H, W, C]."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.bias = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
        return self.bias + x * (self.weight * nx + 1)


def sinusoidal_time_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[B] times in [0, 1] -> [B, dim] features of t*1000, cosine half first, float32.

    Kept in float32 whatever the model dtype: rounding t*1000 to bf16 (750 -> 752) moves the
    embedding noticeably, a pitfall of the released sampler.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = (t.float() * 1000.0)[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimeEmbedding(nn.Module):
    """Linear -> SiLU -> Linear on the sinusoidal features; output is one LLM-width token."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(features)))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt-V2 block conditioned on t_emb: x -> x + MLP(norm(dwconv(x))), then x*(1+scale)+shift."""

    def __init__(self, channels: int, cond_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, kernel_size=7, padding=3, groups=channels)
        self.norm = RMSNorm(channels, eps)
        self.channelwise_linear_1 = nn.Linear(channels, 4 * channels)
        self.channelwise_norm = GlobalResponseNorm(4 * channels, eps)
        self.channelwise_linear_2 = nn.Linear(4 * channels, channels)
        self.cond_embeds_mapper = nn.Linear(cond_dim, 2 * channels)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W]; t_emb: [B, cond_dim]."""
        if use_triton(x):  # fused RMSNorm, GRN and residual+modulation (fused_kernels/), same weights
            from fused_kernels.convnext import convnext_block_forward

            return convnext_block_forward(self, x, t_emb)
        # Channels-last: oneDNN's depthwise conv is 2-3x faster on it (forward and backward; CPU,
        # the demo's 8x8 grids), the permute below becomes a free view instead of a copy, and the
        # block's output stays channels-last, so the next block pays nothing.
        x = x.contiguous(memory_format=torch.channels_last)
        h = self.depthwise(x).permute(0, 2, 3, 1)
        h = self.norm(h)
        h = self.channelwise_linear_1(h)
        h = F.gelu(h)  # exact (erf) GELU
        h = self.channelwise_norm(h)
        h = self.channelwise_linear_2(h)
        x = x + h.permute(0, 3, 1, 2)
        scale, shift = self.cond_embeds_mapper(F.silu(t_emb)).chunk(2, dim=1)
        return x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]


class MidBlock(nn.Module):
    def __init__(self, channels: int, cond_dim: int, num_blocks: int, eps: float) -> None:
        super().__init__()
        self.res_blocks = nn.ModuleList(ConvNeXtBlock(channels, cond_dim, eps) for _ in range(num_blocks))

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        for block in self.res_blocks:
            x = block(x, t_emb)
        return x


class GenerationEncoder(nn.Module):
    """z_t [B, C_lat, S, S] and t [B] -> (features [B, C, S/p, S/p], t_emb [B, llm_hidden]).

    The features are both the latent tokens (after ``vision_gen_enc_aligner``, outside this module)
    and the long skip into the decoder.
    """

    def __init__(self, cfg: GenerationVisionConfig, llm_hidden: int) -> None:
        super().__init__()
        self.time_embed_dim = cfg.time_embed_dim
        self.time_embed = TimeEmbedding(cfg.time_embed_dim, llm_hidden)
        self.in_conv = nn.Conv2d(
            cfg.latent_channels, cfg.channels, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.mid_block = MidBlock(cfg.channels, llm_hidden, cfg.num_blocks, cfg.norm_eps)

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_time_features(t, self.time_embed_dim)
        return self.time_embed(features.to(self.time_embed.linear_1.weight.dtype))

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t_emb = self.embed_time(t)
        return self.mid_block(self.in_conv(z), t_emb), t_emb


class DecoderOutput(nn.Module):
    def __init__(self, channels: int, out_channels: int, patch_size: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(channels, eps)
        self.unpatch_conv = nn.Conv2d(channels, out_channels * patch_size**2, kernel_size=1)
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return F.pixel_shuffle(self.unpatch_conv(x), self.patch_size)


class GenerationDecoder(nn.Module):
    """(LLM features [B, C, s, s], skip [B, C, s, s], t_emb) -> velocity [B, C_lat, S, S]."""

    def __init__(self, cfg: GenerationVisionConfig, llm_hidden: int) -> None:
        super().__init__()
        self.input_norm = RMSNorm(cfg.channels, cfg.norm_eps)
        width = 2 * cfg.channels  # LLM features concatenated with the long skip
        self.mid_block = MidBlock(width, llm_hidden, cfg.num_blocks, cfg.norm_eps)
        self.out_convs = nn.ModuleList(
            [DecoderOutput(width, cfg.latent_channels, cfg.patch_size, cfg.norm_eps)]
        )

    def forward(self, llm_features: torch.Tensor, skip: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        x = self.input_norm(llm_features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = self.mid_block(torch.cat([x, skip], dim=1), t_emb)
        return self.out_convs[0](x)


def tokens_to_grid(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """[B, side*side, C] row-major tokens -> [B, C, side, side]."""
    batch, _, channels = tokens.shape
    return tokens.reshape(batch, side, side, channels).permute(0, 3, 1, 2)


def grid_to_tokens(grid: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h*w, C], row-major."""
    return grid.flatten(2).transpose(1, 2)
