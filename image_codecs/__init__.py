"""Frozen image tokenizers that turn pixels into the discrete codes Janus-Pro models, and back.

Both sides use them: ``data_tools`` encodes generation images into codes offline (stored in the
shards), ``pretrain`` decodes sampled codes into pictures. So this package imports neither of them
(only torch/numpy), like ``datacontract``.

Every codec has the same small interface (``ImageCodec``):
- ``codebook_size`` (int) and ``downsample`` (pixels per code along each side);
- ``encode(pixels)``: float [N, 3, H, W] in [-1, 1] -> int64 codes [N, (H/d) * (W/d)], row-major;
- ``decode(codes, grid)``: int64 [N, h * w] and ``grid = (h, w)`` -> float pixels [N, 3, h*d, w*d] in
  [-1, 1] (before the released uint8 post-processing);
- ``describe()``: a small JSON-able dict (kind, sizes, a fingerprint of the weights) that the shard
  manifest stores, so training and sampling can check they use the codec the shards were built with.

Kinds: ``vq16`` (the LlamaGen VQ-16 tokenizer of Janus-Pro, ``image_codecs.vq16``) and
``kmeans_patches`` (a k-means codebook over pixel patches fitted offline, for CPU runs,
``image_codecs.kmeans``).
"""

from __future__ import annotations

from typing import Protocol

import torch

CODEC_KINDS = ("vq16", "kmeans_patches")


class ImageCodec(Protocol):
    codebook_size: int
    downsample: int

    def encode(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def decode(self, codes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor: ...

    def describe(self) -> dict: ...


def load_image_codec(kind: str, path: str, device: str | torch.device = "cpu") -> ImageCodec:
    """The codec of ``kind`` from a local file or folder ``path`` (never a hub id)."""
    if kind == "vq16":
        from .vq16 import load_vq16

        return load_vq16(path, device)
    if kind == "kmeans_patches":
        from .kmeans import load_kmeans_codec

        return load_kmeans_codec(path, device)
    raise ValueError(f"unknown image codec {kind!r}; one of {', '.join(CODEC_KINDS)}")
