"""Raw records -> documents laid out as ``datacontract/format.py`` says, token by token.

Templates (DeepSeek chat style, as the released JanusFlow checkpoint is prompted):

- understanding: ``BOS [system "\\n\\n"] "User: " Q "\\n\\nAssistant:" " " A EOS`` per turn, where each
  image marker in Q becomes ``[<begin_of_image>, placeholder x N_und, <end_of_image>]``; a caption
  record becomes one turn with Q = marker + "\\n" + ``und_question`` and A = caption. Targets: the
  answer tokens and the EOS closing each answer.
- generation: ``BOS "User: " caption "\\n\\nAssistant:" [TIME, LATENT x N_gen, <end_of_image>]`` (no
  system prompt, as the released sampler). The time slot carries the begin-of-image id, the token the
  released sampler replaces by the time embedding. No token targets.
- text: ``BOS text EOS``; every token after the first is a target.

Janus-Pro (``LayoutOptions.family == "januspro"``, ``format.py``): an understanding image is
``[<begin_of_image> (TEXT), placeholder x N_und, <end_of_image>]``; a generation document ends
``[<begin_of_image> (TEXT), GEN_CODE x N_codes, <end_of_image>]`` with a target on every code. The
builder leaves the placeholder id in the code slots; the build fills in the codes of the image codec
(batched, ``build_units._write_docs``) before the document is stored.

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

from datacontract.format import Task, TokenKind
from datacontract.shards import FAMILIES
from datacontract.images import ImageRejected, crop_seed, encode_image, open_image, prepare_gen_image, prepare_und_image
from datacontract.tokenizer import TokenSpec

from .sources import RawRecord, Reject


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
    max_decoded_bytes: int = 256 << 20  # decoded pixel buffer of one image (16-bit, alpha included)
    max_text_chars: int = 4_000_000  # a text document is cut here before tokenizing (marked truncated)
    family: str = "janusflow"  # "januspro": image codes (gen_downsample = the codec's, gen_patch = 1)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"--family {self.family!r}: one of {', '.join(FAMILIES)}")
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
    gen_pixels: List[np.ndarray] = field(default_factory=list)  # uint8 [R, R, 3], for the VAE/codec only
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
        import re

        self.tokenizer = tokenizer
        self.spec = spec
        self.layout = layout
        ids = {spec.bos_id, spec.eos_id, spec.pad_id, spec.begin_of_image_id, spec.end_of_image_id,
               spec.image_placeholder_id, *getattr(tokenizer, "all_special_ids", [])}
        self._control = frozenset(int(i) for i in ids)
        literals = {tokenizer.convert_ids_to_tokens(i) for i in self._control}
        literals |= {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
        added = getattr(tokenizer, "get_added_vocab", lambda: {})()
        literals |= set(added)
        self._control_literals = frozenset(t for t in literals if t)
        pattern = "|".join(re.escape(t) for t in sorted(self._control_literals, key=len, reverse=True))
        self._control_split = re.compile(f"({pattern})")
        # Janus-Pro has no learned begin-of-image embedding: its <begin_of_image> is a plain token.
        self._und_begin_kind = TokenKind.TEXT if layout.family == "januspro" else TokenKind.UND_IMAGE_BEGIN

    def tokenize(self, text: str) -> List[int]:
        """Token ids of plain text: the literal strings of special tokens in the data ("<eos>",
        "<image_placeholder>", ...) are encoded as ordinary text, never as control ids."""
        if not text:
            return []
        ids = self._encode(text)
        if self._control.isdisjoint(ids):
            return ids
        # An added (non-special) token matched its literal: encode the text around the literals,
        # each literal split in two so that it cannot match any more.
        out: List[int] = []
        for piece in self._control_split.split(text):
            if piece in self._control_literals:
                out += self._encode(piece[:1]) + self._encode(piece[1:])
            elif piece:
                out += self._encode(piece)
        return [i for i in out if i not in self._control] if not self._control.isdisjoint(out) else out

    def _encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    def _tokenize_capped(self, text: str, max_tokens: int):
        """(ids, cut): at most about ``max_tokens`` tokens of a caption or answer. The text is cut to
        16 characters a token before tokenizing, so a 20 MB caption costs no more than a short one."""
        limit = 16 * max(1, max_tokens)
        if len(text) <= limit:
            return self.tokenize(text), False
        return self.tokenize(text[:limit]), True

    def _tokenize_long(self, text: str) -> List[int]:
        """A text document in pieces of about 64 K characters, cut before a space that follows a
        non-space (a pre-token boundary of byte-level BPE), so memory stays bounded."""
        piece = 1 << 16
        if len(text) <= piece:
            return self.tokenize(text)
        ids: List[int] = []
        start = 0
        while start < len(text):
            stop = min(len(text), start + piece)
            if stop < len(text):
                cut = text.rfind(" ", start + 1, stop)
                while cut > start and text[cut - 1].isspace():
                    cut = text.rfind(" ", start + 1, cut - 1)
                stop = cut if cut > start else stop
            ids += self.tokenize(text[start:stop])
            start = stop
        return ids

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
        return encode_image(prepare_und_image(img, lo.resolution, lo.max_decoded_bytes), lo.image_format,
                            lo.jpeg_quality)

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
        capped = False  # a question or answer was cut before tokenizing (longer than any sequence)
        for question, answer in turns:
            parts = question.split(lo.image_marker)
            for i, part in enumerate(parts):
                text = (head + "User: " if i == 0 else "") + part
                if i == len(parts) - 1:
                    text += "\n\nAssistant:"
                question_ids, cut = self._tokenize_capped(text, lo.seq_length)
                capped = capped or cut
                b.add(question_ids)
                if i < len(parts) - 1:
                    b.add([sp.begin_of_image_id], self._und_begin_kind)
                    b.add([sp.image_placeholder_id] * lo.und_tokens, TokenKind.UND_IMAGE)
                    b.add([sp.end_of_image_id])
                    image_ends.append(len(b.ids))
            head = ""
            answer_ids, cut = self._tokenize_capped(" " + answer.strip(), lo.seq_length)
            capped = capped or cut
            b.add(answer_ids, target=True)
            b.add([sp.eos_id], target=True)
        truncated = capped
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
        pixels = prepare_gen_image(img, lo.resolution, seed, lo.max_decoded_bytes)
        image_len = 2 + lo.gen_tokens  # time slot, latents, end of image
        caption = record.caption
        capped = len(caption) > 16 * lo.seq_length
        if capped:
            caption = caption[: 16 * lo.seq_length]  # bounded work before tokenizing (see _tokenize_capped)
        prompt = self.tokenize(f"User: {caption}\n\nAssistant:")
        truncated = capped
        if 1 + len(prompt) + image_len > lo.seq_length or capped:
            head, tail = self.tokenize("User:"), self.tokenize("\n\nAssistant:")
            budget = lo.seq_length - 1 - image_len - len(head) - len(tail)
            if budget < 0:
                return Reject(record.source, record.key, "too_long", "image does not fit the sequence")
            body = self.tokenize(" " + caption)
            truncated = truncated or len(body) > budget
            prompt = head + body[:budget] + tail
        b = _Builder()
        b.add([sp.bos_id])
        b.add(prompt)
        if lo.family == "januspro":  # codes filled in by the build's codec pass
            b.add([sp.begin_of_image_id])
            b.add([sp.image_placeholder_id] * lo.gen_tokens, TokenKind.GEN_CODE, target=True)
        else:
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
        text = record.text
        truncated = len(text) > self.layout.max_text_chars
        if truncated:
            text = text[: self.layout.max_text_chars]
        ids = [sp.bos_id] + self._tokenize_long(text) + [sp.eos_id]
        arr = np.asarray(ids, dtype=np.int32)
        targets = np.ones(len(ids), dtype=np.uint8)
        targets[0] = 0
        kinds = np.zeros(len(ids), dtype=np.uint8)
        return Document(Task.TEXT, record.source, record.key, arr, kinds, targets, truncated=truncated)


def _source_name(path: str) -> str:
    return path.replace("\\", "/").rsplit("/", 1)[-1]
