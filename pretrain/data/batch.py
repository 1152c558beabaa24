"""Model-ready batches: packed rows flattened into one token axis (megatron-core "thd" format).

All documents of all rows of a micro-batch are laid end to end on one axis of T tokens, so no
padding is needed: ``cu_seqlens`` gives the document boundaries, attention never crosses them and
positions restart at 0 in each. Images are listed in order of appearance along T, which is also
the order of their slots (``token_kind``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import List, Optional, Sequence

import numpy as np
import torch

from .format import (
    COL_DOC_LENGTHS,
    COL_DOC_TASKS,
    COL_GEN_IMAGES,
    COL_GEN_LATENT_DTYPE,
    COL_GEN_LATENTS,
    COL_INPUT_IDS,
    COL_TARGET_MASK,
    COL_TOKEN_KIND,
    COL_UND_IMAGES,
)
from .shards import ShardLayout, decode_image, decode_latent


@dataclass
class PackedRow:
    """One packed sequence with its payloads decoded (numpy; built in loader workers)."""

    input_ids: np.ndarray  # int64 [L]
    token_kind: np.ndarray  # uint8 [L]
    target_mask: np.ndarray  # bool [L]
    doc_lengths: np.ndarray  # int64 [D]
    doc_tasks: np.ndarray  # int64 [D]
    und_images: List[np.ndarray]  # uint8 [R, R, 3] each
    gen_images: List[np.ndarray]  # uint8 [R, R, 3] each
    gen_latents: Optional[List[np.ndarray]]  # float32 [C, h, w] each, None without latents
    resolution: int
    latent_shape: Optional[tuple] = None  # (C, h, w) when the shards hold latents


def decode_row(raw: dict, layout: ShardLayout) -> PackedRow:
    """A shard row (``ShardReader.read_row``) -> ``PackedRow``."""
    latents = None
    if raw.get(COL_GEN_LATENTS) is not None and layout.latent_shape is not None:
        dtype = raw.get(COL_GEN_LATENT_DTYPE) or layout.latent_dtype
        latents = [decode_latent(z, dtype, layout.latent_shape) for z in raw[COL_GEN_LATENTS]]
    return PackedRow(
        input_ids=np.asarray(raw[COL_INPUT_IDS], dtype=np.int64),
        token_kind=np.asarray(raw[COL_TOKEN_KIND], dtype=np.uint8),
        target_mask=np.asarray(raw[COL_TARGET_MASK], dtype=bool),
        doc_lengths=np.asarray(raw[COL_DOC_LENGTHS], dtype=np.int64),
        doc_tasks=np.asarray(raw[COL_DOC_TASKS], dtype=np.int64),
        und_images=[decode_image(b) for b in raw[COL_UND_IMAGES]],
        gen_images=[decode_image(b) for b in raw[COL_GEN_IMAGES]],
        gen_latents=latents,
        resolution=layout.resolution,
        latent_shape=tuple(layout.latent_shape) if latents is not None else None,
    )


@dataclass
class PackedBatch:
    """A micro-batch on one token axis. Shapes: T tokens, D documents, B packed rows.

    - ``input_ids`` [T] int64; image/latent/time slots hold a placeholder id (see ``token_kind``)
    - ``position_ids`` [T] int64, restarting at 0 in every document
    - ``cu_seqlens`` [D+1] int32, document boundaries; ``max_seqlen`` the longest document
    - ``token_kind`` [T] int64 (``TokenKind``); ``target_mask`` [T] bool: token i is predicted
      from position i-1 (the loss shifts; a document's first token is never a target)
    - ``doc_tasks`` [D] int64 (``Task``); ``row_lengths`` [B] int64 tokens of each packed row
    - ``und_pixels`` / ``gen_pixels`` [N, 3, R, R] float32 in [-1, 1] ((x/255 - 0.5)/0.5)
    - ``gen_latents`` [N_gen, C, h, w] float32 (unscaled VAE latents) or None
    - ``hidden_prompt_mask`` [T] bool, all False here: the trainer draws the CFG prompt drop
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    token_kind: torch.Tensor
    target_mask: torch.Tensor
    doc_tasks: torch.Tensor
    row_lengths: torch.Tensor
    und_pixels: torch.Tensor
    gen_pixels: torch.Tensor
    gen_latents: Optional[torch.Tensor]
    hidden_prompt_mask: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            moved[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        return PackedBatch(**moved)

    def pin_memory(self) -> "PackedBatch":
        pinned = {}
        for f in fields(self):
            v = getattr(self, f.name)
            pinned[f.name] = v.pin_memory() if isinstance(v, torch.Tensor) else v
        return PackedBatch(**pinned)


def _pixels(images: List[np.ndarray], resolution: int) -> torch.Tensor:
    if not images:
        return torch.zeros(0, 3, resolution, resolution, dtype=torch.float32)
    # Channels first while still uint8 (a quarter of the bytes), then contiguous float passes in
    # numpy: single-threaded, so loader workers do not fight over cores as torch's pool would.
    x = np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2)).astype(np.float32)
    np.divide(x, 127.5, out=x)
    np.subtract(x, 1.0, out=x)  # == (x / 255 - 0.5) / 0.5
    return torch.from_numpy(x)


def position_ids_for(doc_lengths: np.ndarray) -> np.ndarray:
    """0, 1, ..., n-1 for each document length n, concatenated."""
    total = int(doc_lengths.sum())
    starts = np.repeat(np.cumsum(doc_lengths) - doc_lengths, doc_lengths)
    return np.arange(total, dtype=np.int64) - starts


def collate_packed(rows: Sequence[PackedRow]) -> PackedBatch:
    if not rows:
        raise ValueError("collate_packed needs at least one row")
    doc_lengths = np.concatenate([r.doc_lengths for r in rows])
    cu = np.zeros(len(doc_lengths) + 1, dtype=np.int32)
    np.cumsum(doc_lengths, out=cu[1:])
    input_ids = torch.from_numpy(np.concatenate([r.input_ids for r in rows]))
    resolution = rows[0].resolution
    has_latents = rows[0].gen_latents is not None
    latents = None
    if has_latents:
        lat = [z for r in rows for z in (r.gen_latents or [])]
        latents = torch.from_numpy(np.stack(lat)) if lat else torch.zeros(0, *rows[0].latent_shape)
    return PackedBatch(
        input_ids=input_ids,
        position_ids=torch.from_numpy(position_ids_for(doc_lengths)),
        cu_seqlens=torch.from_numpy(cu),
        max_seqlen=int(doc_lengths.max()),
        token_kind=torch.from_numpy(np.concatenate([r.token_kind for r in rows]).astype(np.int64)),
        target_mask=torch.from_numpy(np.concatenate([r.target_mask for r in rows])),
        doc_tasks=torch.from_numpy(np.concatenate([r.doc_tasks for r in rows])),
        row_lengths=torch.tensor([len(r.input_ids) for r in rows], dtype=torch.int64),
        und_pixels=_pixels([im for r in rows for im in r.und_images], resolution),
        gen_pixels=_pixels([im for r in rows for im in r.gen_images], resolution),
        gen_latents=latents,
        hidden_prompt_mask=torch.zeros(input_ids.shape[0], dtype=torch.bool),
    )
