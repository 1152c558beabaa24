"""Model-ready batches: packed rows flattened into one token axis (megatron-core "thd" format).

All documents of all rows of a micro-batch are laid end to end on one axis of T tokens, so no
padding is needed: ``cu_seqlens`` gives the document boundaries, attention never crosses them and
positions restart at 0 in each. Images are listed in order of appearance along T, which is also
the order of their slots (``token_kind``).

Everything the micro-step needs to know about the packing as *numbers* (document lengths, the
longest document, where the image, time and latent slots and the L_AR targets are, how many) is
computed here once, on the CPU, into ``PackingMetadata``: the model and the step then never read a
device tensor back to the host (no ``nonzero``, ``.item()`` or boolean-mask indexing per micro-step).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from datacontract.format import (
    COL_DOC_LENGTHS,
    COL_DOC_TASKS,
    COL_GEN_IMAGES,
    COL_GEN_LATENT_DTYPE,
    COL_GEN_LATENTS,
    COL_INPUT_IDS,
    COL_TARGET_MASK,
    COL_TOKEN_KIND,
    COL_UND_IMAGES,
    Task,
    TokenKind,
)
from datacontract.shards import ShardLayout, decode_image, decode_latent


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


def decode_row(raw: dict, layout: ShardLayout, vocab_size: Optional[int] = None) -> PackedRow:
    """A shard row (``ShardReader.read_row``) -> ``PackedRow``. A row that breaks the contract of
    ``format.py`` (``check_row``) raises ``ValueError`` saying how, so that it is not trained on."""
    for col in (COL_INPUT_IDS, COL_TOKEN_KIND, COL_TARGET_MASK, COL_DOC_LENGTHS, COL_DOC_TASKS, COL_UND_IMAGES,
                COL_GEN_IMAGES):
        if raw.get(col) is None or None in raw[col]:
            raise ValueError(f"{col} is null or holds a null")
    row = PackedRow(
        input_ids=np.asarray(raw[COL_INPUT_IDS], dtype=np.int64),
        token_kind=np.asarray(raw[COL_TOKEN_KIND], dtype=np.uint8),
        target_mask=np.asarray(raw[COL_TARGET_MASK], dtype=bool),
        doc_lengths=np.asarray(raw[COL_DOC_LENGTHS], dtype=np.int64),
        doc_tasks=np.asarray(raw[COL_DOC_TASKS], dtype=np.int64),
        und_images=[],
        gen_images=[],
        gen_latents=None,
        resolution=layout.resolution,
    )
    check_row(row, len(raw[COL_UND_IMAGES]), len(raw[COL_GEN_IMAGES]), layout, vocab_size)
    for col, out in ((COL_UND_IMAGES, row.und_images), (COL_GEN_IMAGES, row.gen_images)):
        for i, data in enumerate(raw[col]):
            try:
                out.append(decode_image(data, layout.resolution))
            except ValueError as err:
                raise ValueError(f"{col}[{i}] is {err}") from None
    if raw.get(COL_GEN_LATENTS) is not None and layout.latent_shape is not None:
        dtype = raw.get(COL_GEN_LATENT_DTYPE) or layout.latent_dtype
        latents = [decode_latent(z, dtype, layout.latent_shape) for z in raw[COL_GEN_LATENTS]]
        if len(latents) != len(row.gen_images):
            raise ValueError(f"{len(latents)} latents for {len(row.gen_images)} generation images")
        if latents and not np.isfinite(np.stack(latents)).all():
            raise ValueError("a latent holds NaN or Inf")
        row.gen_latents, row.latent_shape = latents, tuple(layout.latent_shape)
    return row


def check_row(row: PackedRow, n_und_images: int, n_gen_images: int, layout: ShardLayout,
              vocab_size: Optional[int] = None) -> None:
    """The invariants the batch and the model rely on, in whole-array numpy (no loop over tokens or
    documents): lengths that agree, at most ``seq_length`` tokens, known token kinds and tasks, token
    ids in the vocabulary (image codes in the codebook) and as many images as image slots."""
    n = len(row.input_ids)
    lengths = row.doc_lengths
    if not (len(row.token_kind) == len(row.target_mask) == n == int(lengths.sum())) or len(lengths) != len(row.doc_tasks):
        raise ValueError(f"lengths disagree: input_ids {n}, token_kind {len(row.token_kind)}, target_mask "
                         f"{len(row.target_mask)}, documents sum to {int(lengths.sum())}, {len(lengths)} document "
                         f"lengths for {len(row.doc_tasks)} tasks")
    if not len(lengths) or lengths.min() < 1:
        raise ValueError(f"document lengths {lengths.tolist()[:8]} (each must be at least 1)")
    if n > layout.seq_length:
        raise ValueError(f"{n} tokens, more than the layout's seq_length {layout.seq_length}")
    if row.token_kind.max() >= len(TokenKind):
        raise ValueError(f"unknown token kind {int(row.token_kind.max())} (format.TokenKind has 0..{len(TokenKind) - 1})")
    if row.doc_tasks.min() < 0 or row.doc_tasks.max() >= len(Task):
        raise ValueError(f"unknown document task {int(row.doc_tasks.max())} (format.Task has 0..{len(Task) - 1})")
    is_code = row.token_kind == TokenKind.GEN_CODE
    ids, codes = row.input_ids, None
    if is_code.any():
        ids, codes = ids[~is_code], ids[is_code]
    if len(ids) and (ids.min() < 0 or (vocab_size is not None and ids.max() >= vocab_size)):
        vocab = f"the model's vocabulary 0..{vocab_size - 1}" if vocab_size is not None else "the vocabulary"
        raise ValueError(f"token ids {int(ids.min())}..{int(ids.max())} outside {vocab}; were the shards built "
                         "with another tokenizer than the model's?")
    codebook = int((layout.image_codec or {}).get("codebook_size") or 0)
    if codes is not None and (codes.min() < 0 or (codebook and codes.max() >= codebook)):
        raise ValueError(f"image codes {int(codes.min())}..{int(codes.max())} outside the codebook 0..{codebook - 1}")
    counts = np.bincount(row.token_kind, minlength=len(TokenKind))
    und_slots = int(counts[TokenKind.UND_IMAGE])
    gen_slots = int(counts[TokenKind.GEN_LATENT] + counts[TokenKind.GEN_CODE])
    if und_slots != n_und_images * layout.und_tokens_per_image or gen_slots != n_gen_images * layout.gen_tokens_per_image:
        raise ValueError(f"{n_und_images} understanding and {n_gen_images} generation images for {und_slots} and "
                         f"{gen_slots} image slots ({layout.und_tokens_per_image} and {layout.gen_tokens_per_image} "
                         "per image)")


def ar_target_flags(target_mask: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Bool [T]: the L_AR targets. A document's first token is never a target (nothing precedes it
    in its document), whatever the mask says. (The one owner of this rule.)"""
    is_target = target_mask.bool().clone()
    is_target[cu_seqlens[:-1].long()] = False
    return is_target


@dataclass
class PackingMetadata:
    """Host-side facts of one micro-batch, computed once when it is built (python ints and int64
    CPU tensors). ``PackedBatch.to(device)`` leaves it on the host; ``on(device)`` gives (and
    caches) device copies of the index tensors, one host-to-device copy each, never a read back.

    - ``doc_lengths``: tokens of each document; ``max_seqlen``: the longest (0 without documents)
    - ``und_positions`` [N_und * P_und], ``und_begin_positions`` [N_und]: understanding image slots
    - ``gen_time_positions`` [N_gen], ``gen_latent_positions`` [N_gen * P_gen]: generation slots
    - ``ar_target_positions`` [N_ar]: tokens that are L_AR targets (``ar_target_flags``), image codes
      excepted; ``ar_target_doc_sizes`` [N_ar]: how many such targets each one's document holds (the
      per-document L_AR mean divides by it); ``num_ar_documents``: documents with at least one
    - ``gen_code_positions`` [N_gen * P_codes]: Janus-Pro's image-code slots (all of them targets of
      the image head, except a document's first token, which never is)
    - ``gen_start_positions`` [N_gen]: where each generation document's image begins: its time token
      (JanusFlow) or the ``<begin_of_image>`` token before its first code (Janus-Pro)
    - ``prompt_owner`` [T]: for a token of the droppable prompt of generation document g (after its
      BOS, before its image start) g, else ``num_gen``; the CFG drop acts on prompts through it.
    - ``task_docs``: documents of each ``Task`` (index = task value), for throughput accounting
    """

    doc_lengths: Tuple[int, ...]
    max_seqlen: int
    und_positions: torch.Tensor
    und_begin_positions: torch.Tensor
    gen_time_positions: torch.Tensor
    gen_latent_positions: torch.Tensor
    ar_target_positions: torch.Tensor
    prompt_owner: torch.Tensor
    ar_target_doc_sizes: torch.Tensor
    gen_code_positions: torch.Tensor
    gen_start_positions: torch.Tensor
    task_docs: Tuple[int, ...] = ()
    num_ar_documents: int = 0
    # Understanding images = runs of UND_IMAGE slots (Janus-Pro's have no UND_IMAGE_BEGIN to count).
    und_image_count: int = 0
    _on_device: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)

    INDEX_FIELDS = ("und_positions", "und_begin_positions", "gen_time_positions", "gen_latent_positions",
                    "ar_target_positions", "prompt_owner", "ar_target_doc_sizes", "gen_code_positions",
                    "gen_start_positions")

    @property
    def num_tokens(self) -> int:
        return int(self.prompt_owner.shape[0])

    @property
    def num_gen(self) -> int:
        return int(self.gen_start_positions.shape[0])

    @property
    def num_und_images(self) -> int:
        return self.und_image_count

    @property
    def num_ar_targets(self) -> int:
        return int(self.ar_target_positions.shape[0])

    def on(self, device) -> Dict[str, torch.Tensor]:
        """{field: index tensor on ``device``} for ``INDEX_FIELDS``, copied once per device."""
        key = str(torch.device(device))
        if key not in self._on_device:
            self._on_device[key] = {
                name: getattr(self, name).to(device, non_blocking=True) for name in self.INDEX_FIELDS
            }
        return self._on_device[key]

    def to(self, device, non_blocking: bool = False) -> "PackingMetadata":
        return self  # host-side by design

    def pin_memory(self) -> "PackingMetadata":
        return self

    @classmethod
    def from_arrays(
        cls,
        doc_lengths: np.ndarray,
        token_kind: np.ndarray,
        target_mask: np.ndarray,
        doc_tasks: Optional[np.ndarray] = None,
    ) -> "PackingMetadata":
        """From host arrays: document lengths [D], token kinds [T], target flags [T], tasks [D]."""
        doc_lengths = np.asarray(doc_lengths, dtype=np.int64)
        kinds = np.asarray(token_kind).astype(np.int64)
        total = int(doc_lengths.sum())
        if kinds.shape[0] != total:
            raise ValueError(f"token_kind has {kinds.shape[0]} tokens but the documents sum to {total}")
        starts = np.cumsum(doc_lengths) - doc_lengths
        targets = np.asarray(target_mask, dtype=bool).copy()
        targets[starts[doc_lengths > 0]] = False  # see ar_target_flags
        ends = np.cumsum(doc_lengths)
        doc_of = lambda positions: np.searchsorted(ends, positions, side="right")  # noqa: E731
        time_pos = np.flatnonzero(kinds == TokenKind.GEN_TIME)
        code_pos = np.flatnonzero(kinds == TokenKind.GEN_CODE)
        if len(time_pos) and len(code_pos):
            raise ValueError("a batch mixes JanusFlow time tokens (GEN_TIME) and Janus-Pro image codes (GEN_CODE): "
                             "the shards were built for two model families")
        if len(code_pos):  # Janus-Pro: the image starts at <begin_of_image>, just before the first code
            code_docs = doc_of(code_pos)
            first = np.r_[True, code_docs[1:] != code_docs[:-1]]
            start_pos, start_docs = code_pos[first] - 1, code_docs[first]
        else:
            start_pos, start_docs = time_pos, doc_of(time_pos)
            if len(np.unique(start_docs)) != len(start_docs):
                raise ValueError("a document holds more than one generation time token (GEN_TIME): one per "
                                 "generation document")
        owner = np.full(total, len(start_pos), dtype=np.int64)
        for g, (pos, doc) in enumerate(zip(start_pos, start_docs)):
            owner[starts[doc] + 1:pos] = g
        is_code = kinds == TokenKind.GEN_CODE
        ar_targets = np.flatnonzero(targets & ~is_code)
        target_docs = doc_of(ar_targets)
        per_doc = np.bincount(target_docs, minlength=len(doc_lengths))
        index = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
        return cls(
            doc_lengths=tuple(int(n) for n in doc_lengths),
            max_seqlen=int(doc_lengths.max()) if len(doc_lengths) else 0,
            und_positions=index(np.flatnonzero(kinds == TokenKind.UND_IMAGE)),
            und_begin_positions=index(np.flatnonzero(kinds == TokenKind.UND_IMAGE_BEGIN)),
            gen_time_positions=index(time_pos),
            gen_latent_positions=index(np.flatnonzero(kinds == TokenKind.GEN_LATENT)),
            ar_target_positions=index(ar_targets),
            prompt_owner=torch.from_numpy(owner),
            ar_target_doc_sizes=index(per_doc[target_docs]),
            num_ar_documents=int(np.count_nonzero(per_doc)),
            und_image_count=int(np.count_nonzero(np.diff(np.r_[0, (kinds == TokenKind.UND_IMAGE).astype(np.int8)]) == 1)),
            gen_code_positions=index(code_pos),
            gen_start_positions=index(start_pos),
            task_docs=() if doc_tasks is None else tuple(
                int(n) for n in np.bincount(np.asarray(doc_tasks, dtype=np.int64), minlength=len(Task))),
        )

    @classmethod
    def from_tensors(
        cls, cu_seqlens: torch.Tensor, token_kind: torch.Tensor, target_mask: Optional[torch.Tensor]
    ) -> "PackingMetadata":
        """From the batch tensors (reads them back to the host: one sync each on a GPU). For batches
        not built by ``collate_packed`` (samplers, tests); the loader's batches carry it already."""
        cu = cu_seqlens.detach().cpu().long().numpy()
        kinds = token_kind.detach().cpu().numpy()
        targets = np.zeros(len(kinds), bool) if target_mask is None else target_mask.detach().cpu().numpy()
        return cls.from_arrays(np.diff(cu), kinds, targets)


def packing_metadata(batch) -> PackingMetadata:
    """The batch's ``metadata`` if it carries one, else built from its tensors (see ``from_tensors``)."""
    meta = getattr(batch, "metadata", None)
    if meta is None:
        meta = PackingMetadata.from_tensors(batch.cu_seqlens, batch.token_kind, getattr(batch, "target_mask", None))
    return meta


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
    - ``metadata``: ``PackingMetadata``, host-side (``to`` leaves it on the CPU)
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
    metadata: Optional[PackingMetadata] = None

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
    token_kind = np.concatenate([r.token_kind for r in rows])
    target_mask = np.concatenate([r.target_mask for r in rows])
    doc_tasks = np.concatenate([r.doc_tasks for r in rows])
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
        token_kind=torch.from_numpy(token_kind.astype(np.int64)),
        target_mask=torch.from_numpy(target_mask),
        doc_tasks=torch.from_numpy(doc_tasks),
        row_lengths=torch.tensor([len(r.input_ids) for r in rows], dtype=torch.int64),
        und_pixels=_pixels([im for r in rows for im in r.und_images], resolution),
        gen_pixels=_pixels([im for r in rows for im in r.gen_images], resolution),
        gen_latents=latents,
        hidden_prompt_mask=torch.zeros(input_ids.shape[0], dtype=torch.bool),
        metadata=PackingMetadata.from_arrays(doc_lengths, token_kind, target_mask, doc_tasks),
    )
