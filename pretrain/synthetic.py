"""Random model-ready batches in the packed layout of ``datacontract.format``.

For unit/parity tests and the smoke run: documents of each task with the right token kinds, image
slots and targets, random token ids and random pixels/latents. Not a data set (the demo's synthetic
*images* are made by ``data_tools``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Sequence

import numpy as np
import torch

from datacontract.format import Task, TokenKind

from .data.batch import PackingMetadata
from .model.config import ModelConfig


@dataclass
class SyntheticBatch:
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    token_kind: torch.Tensor
    target_mask: torch.Tensor
    doc_tasks: torch.Tensor
    und_pixels: Optional[torch.Tensor]
    gen_pixels: Optional[torch.Tensor]
    gen_latents: Optional[torch.Tensor]
    # Host-side packing facts (``pretrain.data.batch.PackingMetadata``), as the loader's collate makes
    # them: the step reads no device tensor back for them. Stays on the host in ``to``.
    metadata: Optional[PackingMetadata] = None

    def to(self, device) -> "SyntheticBatch":
        return SyntheticBatch(**{f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
                                 for f in fields(self)})


def _document(task: Task, cfg: ModelConfig, text_len: int, g: torch.Generator) -> tuple[list[int], list[int]]:
    """(token kinds, target flags) of one document."""
    n_und = cfg.und_encoder.num_image_tokens
    n_gen = cfg.gen_vision.num_latent_tokens
    if task == Task.UNDERSTANDING:
        question = max(1, text_len // 2)
        answer = max(1, text_len - question)
        # JanusFlow: a learned begin-of-image embedding; Janus-Pro: a plain <begin_of_image> token.
        begin = TokenKind.TEXT if cfg.family == "januspro" else TokenKind.UND_IMAGE_BEGIN
        kinds = [TokenKind.TEXT] * 2 + [begin] + [TokenKind.UND_IMAGE] * n_und
        kinds += [TokenKind.TEXT] * (1 + question + answer)
        targets = [0] * (len(kinds) - answer) + [1] * answer
    elif task == Task.GENERATION and cfg.family == "januspro":
        # BOS + prompt, <begin_of_image>, the codes (the image head's targets), <end_of_image>.
        codes = cfg.image_tokens.num_codes(cfg.und_encoder.image_size)
        kinds = [TokenKind.TEXT] * (2 + text_len) + [TokenKind.GEN_CODE] * codes + [TokenKind.TEXT]
        targets = [0] * (2 + text_len) + [1] * codes + [0]
    elif task == Task.GENERATION:
        kinds = [TokenKind.TEXT] * (1 + text_len) + [TokenKind.GEN_TIME] + [TokenKind.GEN_LATENT] * n_gen
        kinds += [TokenKind.TEXT]
        targets = [0] * len(kinds)
    else:
        kinds = [TokenKind.TEXT] * max(2, text_len)
        targets = [0] + [1] * (len(kinds) - 1)
    return [int(k) for k in kinds], targets


def make_synthetic_batch(
    cfg: ModelConfig,
    tasks: Sequence[Task],
    generator: torch.Generator,
    text_len: int = 6,
) -> SyntheticBatch:
    """One micro-batch holding one document per entry of ``tasks``, laid end to end."""
    kinds: list[int] = []
    targets: list[int] = []
    positions: list[int] = []
    lengths: list[int] = []
    for task in tasks:
        doc_kinds, doc_targets = _document(Task(task), cfg, text_len, generator)
        kinds += doc_kinds
        targets += doc_targets
        positions += list(range(len(doc_kinds)))
        lengths.append(len(doc_kinds))
    total = len(kinds)
    n_und = sum(1 for t in tasks if t == Task.UNDERSTANDING)
    n_gen = sum(1 for t in tasks if t == Task.GENERATION)
    res = cfg.und_encoder.image_size
    gv = cfg.gen_vision

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    input_ids = torch.randint(0, cfg.llm.vocab_size, (total,), generator=generator)
    if cfg.family == "januspro":  # Janus-Pro: codes instead of pixels and latents
        is_code = torch.tensor(kinds) == TokenKind.GEN_CODE
        input_ids[is_code] = torch.randint(0, cfg.image_tokens.codebook_size, (int(is_code.sum()),), generator=generator)
        n_pixels_gen = 0
    else:
        n_pixels_gen = n_gen
    return SyntheticBatch(
        input_ids=input_ids,
        position_ids=torch.tensor(positions),
        cu_seqlens=torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32),
        token_kind=torch.tensor(kinds, dtype=torch.uint8),
        target_mask=torch.tensor(targets, dtype=torch.bool),
        doc_tasks=torch.tensor([int(t) for t in tasks], dtype=torch.uint8),
        und_pixels=randn(n_und, 3, res, res).clamp(-1, 1) if n_und else None,
        gen_pixels=randn(n_gen, 3, res, res).clamp(-1, 1) if n_pixels_gen else None,
        gen_latents=randn(n_gen, gv.latent_channels, gv.latent_size, gv.latent_size) if n_pixels_gen else None,
        metadata=PackingMetadata.from_arrays(np.array(lengths), np.array(kinds), np.array(targets, dtype=bool),
                                             np.array([int(t) for t in tasks])),
    )
