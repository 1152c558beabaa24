"""Typed architecture settings of both model families; the recipe nests these under ``model``.

``model.family`` says which: ``janusflow`` (rectified-flow generation: ``gen_vision`` and ``repa``
apply) or ``januspro`` (autoregressive generation of VQ codes: ``image_tokens`` applies). The LLM
and the SigLIP understanding encoder are common. Each dataclass checks its own invariants in
``__post_init__`` so an impossible architecture fails when the recipe is read, before any weight is
allocated. Defaults are the released JanusFlow-1.3B (and, for ``image_tokens``, Janus-Pro's VQ-16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional


class ConfigError(ValueError):
    """A recipe value is wrong; the message names the key and what to do."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _require_positive(config: object, prefix: str, *keys: str) -> None:
    # Sizes are checked before they divide anything: 0 would end the check in a ZeroDivisionError.
    # Float settings are checked as finite too: NaN fails every comparison, so "> 0" lets it pass.
    for key in keys:
        value = getattr(config, key)
        _require(math.isfinite(value) and value > 0, f"{prefix}.{key}", f"must be positive, got {value}")


@dataclass
class LLMConfig:
    """The Llama-architecture language model (DeepSeek-LLM 1.3B by default)."""

    vocab_size: int = 102400
    hidden_size: int = 2048
    ffn_hidden_size: int = 5632
    num_layers: int = 24
    num_attention_heads: int = 16
    # None means multi-head attention (one key/value head per query head), as in DeepSeek-LLM 1.3B.
    num_query_groups: Optional[int] = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        _require_positive(self, "model.llm", "vocab_size", "hidden_size", "ffn_hidden_size", "num_layers",
                          "num_attention_heads", "rope_theta", "norm_eps")
        _require(
            self.hidden_size % self.num_attention_heads == 0,
            "model.llm.num_attention_heads",
            f"must divide hidden_size={self.hidden_size}",
        )
        if self.num_query_groups is not None:
            _require_positive(self, "model.llm", "num_query_groups")
            _require(
                self.num_attention_heads % self.num_query_groups == 0,
                "model.llm.num_query_groups",
                f"must divide num_attention_heads={self.num_attention_heads}",
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads


@dataclass
class UnderstandingEncoderConfig:
    """SigLIP vision tower (transformers ``SiglipVisionModel``); defaults are SigLIP-L/16 at 384 px."""

    image_size: int = 384
    patch_size: int = 16
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_attention_heads: int = 16
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        _require_positive(self, "model.und_encoder", "image_size", "patch_size", "hidden_size", "intermediate_size",
                          "num_layers", "num_attention_heads", "layer_norm_eps")
        _require(
            self.image_size % self.patch_size == 0,
            "model.und_encoder.patch_size",
            f"must divide image_size={self.image_size}",
        )
        _require(
            self.hidden_size % self.num_attention_heads == 0,
            "model.und_encoder.num_attention_heads",
            f"must divide hidden_size={self.hidden_size}",
        )

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class GenerationVisionConfig:
    """Generation encoder/decoder around the VAE latent (ConvNeXt-V2 blocks, long skip, time token)."""

    latent_channels: int = 4
    latent_size: int = 48
    patch_size: int = 2
    channels: int = 768
    num_blocks: int = 2
    time_embed_dim: int = 768
    norm_eps: float = 1e-6
    # SDXL-VAE latents are multiplied by this before the flow sees them (decode divides by it).
    latent_scale: float = 0.13025
    # What makes latents from pixels: "sdxl_vae" (diffusers AutoencoderKL from init.vae, or latents
    # precomputed in the shards) or "space_to_depth" (a lossless pixel-space latent: each
    # factor x factor block of RGB pixels becomes 3*factor^2 channels; needs no weights, for CPU runs).
    latent_codec: str = "sdxl_vae"

    def __post_init__(self) -> None:
        _require_positive(self, "model.gen_vision", "latent_channels", "latent_size", "patch_size", "channels",
                          "time_embed_dim", "norm_eps", "latent_scale")
        _require(
            self.latent_size % self.patch_size == 0,
            "model.gen_vision.patch_size",
            f"must divide latent_size={self.latent_size}",
        )
        _require(self.time_embed_dim % 2 == 0, "model.gen_vision.time_embed_dim", "must be even")
        _require(self.num_blocks >= 1, "model.gen_vision.num_blocks", "must be at least 1")
        _require(
            self.latent_codec in ("sdxl_vae", "space_to_depth"),
            "model.gen_vision.latent_codec",
            f"must be 'sdxl_vae' or 'space_to_depth', got {self.latent_codec!r}",
        )

    @property
    def num_latent_tokens(self) -> int:
        return (self.latent_size // self.patch_size) ** 2


@dataclass
class RepaConfig:
    """REPA projector: 3-layer SiLU MLP from LLM features after block ``layer`` to SigLIP width."""

    # A model imported only for inference (or a fixture) has no projector: the released weights
    # carry none, since REPA is a training-only regulariser.
    enabled: bool = True
    layer: int = 6
    projector_hidden_size: int = 2048

    def __post_init__(self) -> None:
        _require(self.layer >= 1, "model.repa.layer", "is a 1-based block index: use 1 or more")
        _require_positive(self, "model.repa", "projector_hidden_size")


FAMILIES = ("janusflow", "januspro")
# What turns images into Janus-Pro's codes: the LlamaGen VQ-16 tokenizer (``init.vq``), or, for CPU
# runs, a k-means codebook over pixel patches fitted offline by ``data_tools``.
IMAGE_CODECS = ("vq16", "kmeans_patches")


@dataclass
class ImageTokenConfig:
    """Janus-Pro's discrete image tokens: the codec's grid and codebook, the input embedding table
    (``gen_embed``: codebook x embed_dim, learned, not the VQ codebook) and the image head width."""

    codebook_size: int = 16384
    embed_dim: int = 8
    # Pixels per code along each side (VQ-16: 16, so 384 px -> a 24 x 24 grid of 576 codes).
    downsample: int = 16
    # Hidden width of the image head (Linear -> GELU -> Linear); the released models use the LLM width.
    # None = the LLM width.
    head_hidden_size: Optional[int] = None
    codec: str = "vq16"

    def __post_init__(self) -> None:
        for key in ("codebook_size", "embed_dim", "downsample"):
            _require(getattr(self, key) > 0, f"model.image_tokens.{key}", "must be positive")
        _require(
            self.head_hidden_size is None or self.head_hidden_size > 0,
            "model.image_tokens.head_hidden_size",
            "must be positive (or null for the LLM width)",
        )
        _require(
            self.codec in IMAGE_CODECS,
            "model.image_tokens.codec",
            f"must be one of {', '.join(IMAGE_CODECS)}, got {self.codec!r}",
        )

    def grid_side(self, image_size: int) -> int:
        return image_size // self.downsample

    def num_codes(self, image_size: int) -> int:
        return self.grid_side(image_size) ** 2


@dataclass
class ModelConfig:
    family: str = "janusflow"
    llm: LLMConfig = field(default_factory=LLMConfig)
    und_encoder: UnderstandingEncoderConfig = field(default_factory=UnderstandingEncoderConfig)
    gen_vision: GenerationVisionConfig = field(default_factory=GenerationVisionConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)
    image_tokens: ImageTokenConfig = field(default_factory=ImageTokenConfig)

    def __post_init__(self) -> None:
        _require(
            self.family in FAMILIES,
            "model.family",
            f"must be one of {', '.join(FAMILIES)}, got {self.family!r}",
        )
        if self.family == "januspro":
            size, step = self.und_encoder.image_size, self.image_tokens.downsample
            _require(
                size % step == 0,
                "model.image_tokens.downsample",
                f"must divide model.und_encoder.image_size={size} (the codes cover the whole image)",
            )
            return  # gen_vision and repa describe JanusFlow's flow head; Janus-Pro has neither
        _require(
            self.repa.layer <= self.llm.num_layers,
            "model.repa.layer",
            f"must be at most model.llm.num_layers={self.llm.num_layers}",
        )
        gv = self.gen_vision
        if gv.latent_codec == "space_to_depth":
            factor = self.und_encoder.image_size // gv.latent_size
            _require(
                factor * gv.latent_size == self.und_encoder.image_size and gv.latent_channels == 3 * factor**2,
                "model.gen_vision.latent_channels",
                f"space_to_depth of {self.und_encoder.image_size} px images to {gv.latent_size}x{gv.latent_size} "
                f"gives 3*{factor}^2={3 * factor**2} channels; set latent_channels to that",
            )
        # REPA compares SigLIP's patch features with the LLM features at the latent positions one
        # to one, so both grids must have the same size (the paper sets H_gen = H_im on purpose).
        _require(
            not self.repa.enabled
            or self.und_encoder.num_image_tokens == self.gen_vision.num_latent_tokens,
            "model.gen_vision.latent_size",
            f"gives {self.gen_vision.num_latent_tokens} latent tokens but SigLIP gives "
            f"{self.und_encoder.num_image_tokens} image tokens; REPA needs equal grids",
        )
