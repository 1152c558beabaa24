"""Tokenizers: load one from a local directory, or build a small one offline (tests, demos).

Only local paths are ever loaded (no hub access at run time). ``TokenSpec`` resolves the special
tokens that the document layouts of ``pretrain/data/format.py`` need and fails early, naming the
option to set, when the tokenizer lacks one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Optional

DEFAULT_BEGIN_OF_IMAGE = "<begin_of_image>"
DEFAULT_END_OF_IMAGE = "<end_of_image>"
DEFAULT_IMAGE_PLACEHOLDER = "<image_placeholder>"
# Names used by the small tokenizer built here; real tokenizers bring their own BOS/EOS/pad.
SMALL_BOS, SMALL_EOS, SMALL_PAD = "<bos>", "<eos>", "<pad>"


@dataclass(frozen=True)
class TokenSpec:
    """Token ids the document builders need."""

    bos_id: int
    eos_id: int
    pad_id: int
    begin_of_image_id: int
    end_of_image_id: int
    image_placeholder_id: int


def load_tokenizer(path: str):
    """``AutoTokenizer`` from a local directory (refuses anything that is not a directory)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"tokenizer path {path!r} is not a local directory (hub ids are not loaded at run time)"
        )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def resolve_token_spec(
    tokenizer,
    begin_of_image: str = DEFAULT_BEGIN_OF_IMAGE,
    end_of_image: str = DEFAULT_END_OF_IMAGE,
    image_placeholder: str = DEFAULT_IMAGE_PLACEHOLDER,
    pad_token: Optional[str] = None,
) -> TokenSpec:
    def token_id(token: str, option: str) -> int:
        ids = tokenizer.convert_tokens_to_ids([token])
        tid = ids[0] if ids else None
        if tid is None or (tokenizer.unk_token_id is not None and tid == tokenizer.unk_token_id):
            raise ValueError(f"tokenizer has no token {token!r}: set {option} to a token it has")
        return int(tid)

    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("tokenizer must define bos_token and eos_token")
    if pad_token is not None:
        pad_id = token_id(pad_token, "--pad-token")
    elif tokenizer.pad_token_id is not None:
        pad_id = int(tokenizer.pad_token_id)
    else:
        pad_id = int(tokenizer.eos_token_id)
    return TokenSpec(
        bos_id=int(tokenizer.bos_token_id),
        eos_id=int(tokenizer.eos_token_id),
        pad_id=pad_id,
        begin_of_image_id=token_id(begin_of_image, "--begin-of-image"),
        end_of_image_id=token_id(end_of_image, "--end-of-image"),
        image_placeholder_id=token_id(image_placeholder, "--image-placeholder"),
    )


def build_small_tokenizer(out_dir: str, texts: Iterable[str], vocab_size: int = 512) -> str:
    """Train a byte-level BPE tokenizer on ``texts`` and save it (``save_pretrained``) to ``out_dir``.

    Byte-level, so any UTF-8 text encodes and decodes back exactly. It carries BOS/EOS/pad and the
    three image special tokens with their default strings. Returns ``out_dir``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [
        SMALL_BOS,
        SMALL_EOS,
        SMALL_PAD,
        DEFAULT_BEGIN_OF_IMAGE,
        DEFAULT_END_OF_IMAGE,
        DEFAULT_IMAGE_PLACEHOLDER,
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SMALL_BOS,
        eos_token=SMALL_EOS,
        pad_token=SMALL_PAD,
        additional_special_tokens=[DEFAULT_BEGIN_OF_IMAGE, DEFAULT_END_OF_IMAGE, DEFAULT_IMAGE_PLACEHOLDER],
        clean_up_tokenization_spaces=False,
    )
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


DEMO_TEXTS = (
    "User: Assistant: Generate the caption of this picture. A photo of a red cat sitting on a wooden "
    "table next to a blue cup. The quick brown fox jumps over the lazy dog. 0123456789 ,.;:!?'\"()[]",
    "a dog running in the park, green grass, sunny day, high quality photograph, detailed, colourful",
    "Numbers, letters and words: the image shows two people walking along a beach at sunset.",
)
