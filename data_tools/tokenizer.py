"""Build a small byte-level BPE tokenizer offline (tests, demos); loading and the special-token spec
are the data contract's (``datacontract.tokenizer``)."""

from __future__ import annotations

import os
from typing import Iterable

from datacontract.tokenizer import DEFAULT_BEGIN_OF_IMAGE, DEFAULT_END_OF_IMAGE, DEFAULT_IMAGE_PLACEHOLDER

# Names used by the small tokenizer built here; real tokenizers bring their own BOS/EOS/pad.
SMALL_BOS, SMALL_EOS, SMALL_PAD = "<bos>", "<eos>", "<pad>"

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
