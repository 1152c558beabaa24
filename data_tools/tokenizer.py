"""Build a small byte-level BPE tokenizer offline (tests, demos); loading and the special-token spec
are the data contract's (``datacontract.tokenizer``)."""

from __future__ import annotations

import argparse
import codecs
import json
import os
import re
import shutil
import uuid
from itertools import chain
from typing import Callable, Iterable, Iterator, List, Tuple

from datacontract.tokenizer import (
    DEFAULT_BEGIN_OF_IMAGE,
    DEFAULT_END_OF_IMAGE,
    DEFAULT_IMAGE_PLACEHOLDER,
    TOKENIZER_CONTENT_FILES,
)

from .arg_types import whole_number
from .state import nearest_existing, tokenizer_fingerprint

# Names used by the small tokenizer built here; real tokenizers bring their own BOS/EOS/pad.
SMALL_BOS, SMALL_EOS, SMALL_PAD = "<bos>", "<eos>", "<pad>"
SMALL_SPECIALS = (SMALL_BOS, SMALL_EOS, SMALL_PAD, DEFAULT_BEGIN_OF_IMAGE, DEFAULT_END_OF_IMAGE,
                  DEFAULT_IMAGE_PLACEHOLDER)
# Byte-level: the 256 byte values are tokens before any merge, beside the special tokens, so no
# vocabulary can be smaller.
MIN_VOCAB_SIZE = 256 + len(SMALL_SPECIALS)
# The trainer reserves memory for the whole vocabulary before it starts (about 70 bytes a token:
# 10**9 asked for 70 GB and aborted the process); real tokenizers stay far below this.
MAX_VOCAB_SIZE = 1_000_000
# A longer line is trained on in pieces, so a file without line breaks is never held whole (the
# trainer holds 256 texts at a time; a 47 MB line took 3.7 GB whole). A word cut at a piece's end
# is counted as two: no loss to a tokenizer for tests and demos.
LINE_PIECE_BYTES = 1 << 16
# Encoding takes a special-token string in a text as that token and never sees its pieces, so
# training on the pieces would spend merges on strings no encoding produces.
_SPECIAL_STRING = re.compile("|".join(re.escape(token) for token in SMALL_SPECIALS))


class TokenizerBuildError(Exception):
    """A refusal of ``make-tokenizer``: one line naming the option and what to do (exit status 2)."""


def vocab_size_arg(text: str) -> int:
    """An argparse type for ``--vocab-size``: from MIN_VOCAB_SIZE to MAX_VOCAB_SIZE."""
    value = whole_number(MIN_VOCAB_SIZE, f" (the 256 byte tokens and the {len(SMALL_SPECIALS)} special tokens)")(text)
    if value > MAX_VOCAB_SIZE:
        raise argparse.ArgumentTypeError(f"{value} must be at most {MAX_VOCAB_SIZE}")
    return value


def build_small_tokenizer(out_dir: str, texts: Iterable[str], vocab_size: int = 512) -> str:
    """Train a byte-level BPE tokenizer on ``texts`` and save it (``save_pretrained``) to ``out_dir``.

    Byte-level, so any UTF-8 text encodes and decodes back exactly. It carries BOS/EOS/pad and the
    three image special tokens with their default strings; the same texts give the same files.
    ``texts`` is read once, as it is trained on (a generator is never held whole). A ``vocab_size``
    below MIN_VOCAB_SIZE gives MIN_VOCAB_SIZE tokens (no merges); fewer tokens than asked are made
    when the texts give no more merges. Returns ``out_dir``.

    The files are written to a new folder in ``out_dir`` (or beside it) and moved in only once whole,
    so a failed or interrupted build leaves the earlier tokenizer or none (a new ``out_dir`` appears
    in one rename; into an existing one the files are moved one by one, so only an interruption
    between those renames can leave a mix); that
    folder is made before training, so an ``out_dir`` that cannot be written fails at once
    (``OSError``). Tokenizer files of an earlier tokenizer there that this one does not write are
    removed: a stale ``special_tokens_map.json`` would redefine the special tokens.
    """
    if vocab_size > MAX_VOCAB_SIZE:
        raise ValueError(f"vocab_size {vocab_size} is above {MAX_VOCAB_SIZE}")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    staging = _staging_folder(out_dir)
    try:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SMALL_SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_between_special_strings(texts), trainer=trainer)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token=SMALL_BOS,
            eos_token=SMALL_EOS,
            pad_token=SMALL_PAD,
            additional_special_tokens=[DEFAULT_BEGIN_OF_IMAGE, DEFAULT_END_OF_IMAGE, DEFAULT_IMAGE_PLACEHOLDER],
            clean_up_tokenization_spaces=False,
        )
        fast.save_pretrained(staging)
        _move_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when it became out_dir
    return out_dir


def _between_special_strings(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for piece in _SPECIAL_STRING.split(text):
            if piece:
                yield piece


def _staging_folder(out_dir: str) -> str:
    """A new hidden folder on the file system of ``out_dir``: inside it when it exists, else in the
    nearest folder above it that does (renaming is atomic only within one file system)."""
    anchor = nearest_existing(out_dir)
    # Not tempfile.mkdtemp: its folder is private (mode 0700), and this one may become out_dir.
    staging = os.path.join(anchor, f".make-tokenizer-{uuid.uuid4().hex[:12]}")
    try:
        os.mkdir(staging)
    except OSError as e:  # name the folder the user can act on, not the hidden one
        raise OSError(e.errno, e.strerror, anchor) from None
    return staging


def _move_in(staging: str, out_dir: str) -> None:
    if not os.path.isdir(out_dir):
        os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
        os.rename(staging, out_dir)  # out_dir appears whole or not at all
        return
    written = sorted(os.listdir(staging))
    for name in written:
        os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    for name in TOKENIZER_CONTENT_FILES:
        if name not in written and os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def make_tokenizer(out: str, text_files: List[str], vocab_size: int, log: Callable[[str], None]) -> str:
    """``make-tokenizer``: train on DEMO_TEXTS and every line of ``text_files`` (UTF-8), save to
    ``out`` and log what was made. Input that cannot be used raises TokenizerBuildError, checked
    before training where it can be known then; nothing is left at ``out`` after a refusal."""
    if not out:
        raise TokenizerBuildError("--out is empty: give a folder for the tokenizer")
    if os.path.exists(out) and not os.path.isdir(out):
        raise TokenizerBuildError(f"--out {out} is a file: give a folder (make-tokenizer writes tokenizer.json and "
                                  "tokenizer_config.json into it)")
    for path in text_files:
        if os.path.isdir(path):
            raise TokenizerBuildError(f"--texts {path} is a folder: give text files (UTF-8, one text a line)")
        try:
            open(path, "rb").close()
        except OSError as e:
            raise TokenizerBuildError(f"--texts {path}: cannot read it ({e.strerror or e})") from None
    earlier = tokenizer_fingerprint(out)["files"]
    lines_read = [0]

    def file_lines() -> Iterator[str]:
        for path in text_files:
            lines = 0
            for lines, piece in _utf8_lines(path):
                yield piece
            lines_read[0] += lines

    try:
        build_small_tokenizer(out, chain(DEMO_TEXTS, file_lines()), vocab_size)
    except OSError as e:  # reading --texts raises TokenizerBuildError: this is the writing
        raise TokenizerBuildError(f"--out {out}: cannot write {e.filename or 'there'} ({e.strerror or e}): check the "
                                  "path, its permissions and the free space") from None
    if earlier and earlier != tokenizer_fingerprint(out)["files"]:
        log(f"replaced the tokenizer that was in {out}: builds made with it must be built again")
    with open(os.path.join(out, "tokenizer.json"), encoding="utf-8") as f:
        model = json.load(f)["model"]
    made = len(model["vocab"])
    short = f" (fewer than --vocab-size {vocab_size}: the texts give no more merges)" if made < vocab_size else ""
    log(f"made {made} tokens: 256 bytes, {len(SMALL_SPECIALS)} special tokens and {len(model['merges'])} merges "
        f"learnt from {len(DEMO_TEXTS)} built-in texts and {lines_read[0]} line{'' if lines_read[0] == 1 else 's'} of "
        f"--texts{short}")
    return out


def _utf8_lines(path: str) -> Iterator[Tuple[int, str]]:
    """(line number from 1, text) for the lines of ``path``, without their line breaks (or a leading
    byte-order mark), read LINE_PIECE_BYTES at most at a time: a longer line comes in pieces."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()  # a piece may end inside a character
    line_number = 1
    try:
        with open(path, "rb") as f:
            while True:
                raw = f.readline(LINE_PIECE_BYTES)
                try:
                    text = decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as e:
                    raise TokenizerBuildError(
                        f"--texts {path}: line {line_number} is not UTF-8 (byte 0x{e.object[e.start]:02x}): "
                        "convert the file to UTF-8") from None
                if not raw:
                    return
                if not raw.endswith(b"\n"):  # the last line, or a piece of a long one
                    yield line_number, text
                    continue
                yield line_number, text.removesuffix("\n").removesuffix("\r")
                line_number += 1
    except OSError as e:
        raise TokenizerBuildError(f"--texts {path}: cannot read it ({e.strerror or e})") from None


DEMO_TEXTS = (
    "User: Assistant: Generate the caption of this picture. A photo of a red cat sitting on a wooden "
    "table next to a blue cup. The quick brown fox jumps over the lazy dog. 0123456789 ,.;:!?'\"()[]",
    "a dog running in the park, green grass, sunny day, high quality photograph, detailed, colourful",
    "Numbers, letters and words: the image shows two people walking along a beach at sunset.",
)
