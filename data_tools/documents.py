"""Raw records -> documents laid out as ``pretrain/data/format.py`` says, token by token.

Templates (DeepSeek chat style, as the released JanusFlow checkpoint is prompted):

- understanding: ``BOS [system "\\n\\n"] "User: " Q "\\n\\nAssistant:" " " A EOS`` per turn, where each
  image marker in Q becomes ``[<begin_of_image>, placeholder x N_und, <end_of_image>]``; a caption
  record becomes one turn with Q = marker + "\\n" + ``und_question`` and A = caption. Targets: the
  answer tokens and the EOS closing each answer.
- generation: ``BOS "User: " caption "\\n\\nAssistant:" [TIME, LATENT x N_gen, <end_of_image>]`` (no
  system prompt, as the released sampler). The time slot carries the begin-of-image id, the token the
  released sampler replaces by the time embedding. No token targets.
- text: ``BOS text EOS``; every token after the first is a target.

Length rules (documents longer than the sequence length):
- understanding: the tail is cut (answer text of the last turns; a cut answer loses its EOS) when
  every image still fits and at least one target token remains; otherwise rejected ``too_long``;
- generation: the caption tokens are cut from the end; rejected ``too_long`` if the template and
  image alone do not fit;
- text: never cut here; the packer splits long text documents into pieces (see ``packing.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from pretrain.data.format import Task, TokenKind

from .images import ImageRejected, crop_seed, encode_image, open_image, prepare_gen_image, prepare_und_image
from .sources import RawRecord, Reject
from .tokenizer import TokenSpec


@dataclass(frozen=True)
class LayoutOptions:
    seq_length: int = 4096
    resolution: int = 384
    und_patch: int = 16
    gen_downsample: int = 8
    gen_patch: int = 2
    system_prompt: str = ""
    und_question: str = "Generate the caption of this picture."
    image_marker: str = "<image>"
    image_format: str = "jpeg"
    jpeg_quality: int = 95
    seed: int = 0
    max_pixels: int = 64_000_000
    min_image_side: int = 1

    def __post_init__(self) -> None:
        if self.resolution % self.und_patch:
            raise ValueError(f"--und-patch {self.und_patch} must divide --resolution {self.resolution}")
        if self.resolution % (self.gen_downsample * self.gen_patch):
            raise ValueError(
                f"--gen-downsample x --gen-patch = {self.gen_downsample * self.gen_patch} must divide "
                f"--resolution {self.resolution}"
            )

    @property
    def und_tokens(self) -> int:
        return (self.resolution // self.und_patch) ** 2

    @property
    def gen_tokens(self) -> int:
        return (self.resolution // (self.gen_downsample * self.gen_patch)) ** 2

    @property
    def latent_size(self) -> int:
        return self.resolution // self.gen_downsample


@dataclass
class Document:
    task: Task
    source: str
    key: str
    input_ids: np.ndarray  # int32 [L]
    token_kind: np.ndarray  # uint8 [L]
    target_mask: np.ndarray  # uint8 [L]
    und_images: List[bytes] = field(default_factory=list)
    gen_images: List[bytes] = field(default_factory=list)
    gen_latents: List[bytes] = field(default_factory=list)
    gen_pixels: List[np.ndarray] = field(default_factory=list)  # uint8 [R, R, 3], for the VAE only
    truncated: bool = False

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class _Builder:
    """Accumulates (ids, kinds, targets) segments."""

    def __init__(self) -> None:
        self.ids: List[int] = []
        self.kinds: List[int] = []
        self.targets: List[int] = []

    def add(self, ids, kind: TokenKind = TokenKind.TEXT, target: bool = False) -> None:
        self.ids.extend(ids)
        self.kinds.extend([int(kind)] * len(ids))
        self.targets.extend([int(target)] * len(ids))

    def arrays(self, limit: Optional[int] = None):
        sl = slice(0, limit)
        return (
            np.asarray(self.ids[sl], dtype=np.int32),
            np.asarray(self.kinds[sl], dtype=np.uint8),
            np.asarray(self.targets[sl], dtype=np.uint8),
        )


class DocumentBuilder:
    """Turns one ``RawRecord`` into a ``Document`` or a ``Reject`` (never raises for bad data)."""

    def __init__(self, tokenizer, spec: TokenSpec, layout: LayoutOptions) -> None:
        self.tokenizer = tokenizer
        self.spec = spec
        self.layout = layout

    def tokenize(self, text: str) -> List[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def build(self, record: RawRecord):
        try:
            if record.task == Task.UNDERSTANDING:
                return self._understanding(record)
            if record.task == Task.GENERATION:
                return self._generation(record)
            return self._text(record)
        except ImageRejected as e:
            return Reject(record.source, record.key, e.reason, e.detail)

    # ------------------------------------------------------------------------------ understanding
    def _und_image_bytes(self, data: bytes) -> bytes:
        lo = self.layout
        img = open_image(data, lo.max_pixels, lo.min_image_side)
        return encode_image(prepare_und_image(img, lo.resolution), lo.image_format, lo.jpeg_quality)

    def _understanding(self, record: RawRecord):
        lo, sp = self.layout, self.spec
        turns = record.turns
        if turns is None:
            turns = [(f"{lo.image_marker}\n{lo.und_question}", record.caption)]
        images = [self._und_image_bytes(data) for data in record.images]
        b = _Builder()
        b.add([sp.bos_id])
        head = f"{lo.system_prompt}\n\n" if lo.system_prompt else ""
        image_ends: List[int] = []
        for question, answer in turns:
            parts = question.split(lo.image_marker)
            for i, part in enumerate(parts):
                text = (head + "User: " if i == 0 else "") + part
                if i == len(parts) - 1:
                    text += "\n\nAssistant:"
                b.add(self.tokenize(text))
                if i < len(parts) - 1:
                    b.add([sp.begin_of_image_id], TokenKind.UND_IMAGE_BEGIN)
                    b.add([sp.image_placeholder_id] * lo.und_tokens, TokenKind.UND_IMAGE)
                    b.add([sp.end_of_image_id])
                    image_ends.append(len(b.ids))
            head = ""
            b.add(self.tokenize(" " + answer.strip()), target=True)
            b.add([sp.eos_id], target=True)
        truncated = False
        limit = None
        if len(b.ids) > lo.seq_length:
            last_image_end = image_ends[-1] if image_ends else 0
            if last_image_end > lo.seq_length or not any(b.targets[: lo.seq_length]):
                return Reject(
                    record.source, record.key, "too_long",
                    f"{len(b.ids)} tokens; images and first answer do not fit in {lo.seq_length}",
                )
            truncated, limit = True, lo.seq_length
        ids, kinds, targets = b.arrays(limit)
        return Document(Task.UNDERSTANDING, record.source, record.key, ids, kinds, targets,
                        und_images=images, truncated=truncated)

    # ------------------------------------------------------------------------------ generation
    def _generation(self, record: RawRecord):
        lo, sp = self.layout, self.spec
        img = open_image(record.images[0], lo.max_pixels, lo.min_image_side)
        seed = crop_seed(lo.seed, f"{_source_name(record.source)}:{record.key}")
        pixels = prepare_gen_image(img, lo.resolution, seed)
        prompt = self.tokenize(f"User: {record.caption}\n\nAssistant:")
        image_len = 2 + lo.gen_tokens  # time slot, latents, end of image
        truncated = False
        if 1 + len(prompt) + image_len > lo.seq_length:
            head, tail = self.tokenize("User:"), self.tokenize("\n\nAssistant:")
            budget = lo.seq_length - 1 - image_len - len(head) - len(tail)
            if budget < 0:
                return Reject(record.source, record.key, "too_long", "image does not fit the sequence")
            prompt = head + self.tokenize(" " + record.caption)[:budget] + tail
            truncated = True
        b = _Builder()
        b.add([sp.bos_id])
        b.add(prompt)
        b.add([sp.begin_of_image_id], TokenKind.GEN_TIME)
        b.add([sp.image_placeholder_id] * lo.gen_tokens, TokenKind.GEN_LATENT)
        b.add([sp.end_of_image_id])
        ids, kinds, targets = b.arrays()
        return Document(
            Task.GENERATION, record.source, record.key, ids, kinds, targets,
            gen_images=[encode_image(pixels, lo.image_format, lo.jpeg_quality)],
            gen_pixels=[np.asarray(pixels)], truncated=truncated,
        )

    # ------------------------------------------------------------------------------ text
    def _text(self, record: RawRecord):
        sp = self.spec
        ids = [sp.bos_id] + self.tokenize(record.text) + [sp.eos_id]
        arr = np.asarray(ids, dtype=np.int32)
        targets = np.ones(len(ids), dtype=np.uint8)
        targets[0] = 0
        kinds = np.zeros(len(ids), dtype=np.uint8)
        return Document(Task.TEXT, record.source, record.key, arr, kinds, targets)


def _source_name(path: str) -> str:
    return path.replace("\\", "/").rsplit("/", 1)[-1]
