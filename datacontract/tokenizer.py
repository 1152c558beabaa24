"""Tokenizers as both sides see them: load one from a local directory and resolve its special tokens.

Only local paths are ever loaded (no hub access at run time). ``TokenSpec`` resolves the special
tokens that the document layouts of ``datacontract.format`` need and fails early, naming the option
to set, when the tokenizer lacks one. (Building a small tokenizer offline is a data tool:
``data_tools.tokenizer``.)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

DEFAULT_BEGIN_OF_IMAGE = "<begin_of_image>"
DEFAULT_END_OF_IMAGE = "<end_of_image>"
DEFAULT_IMAGE_PLACEHOLDER = "<image_placeholder>"


@dataclass(frozen=True)
class TokenSpec:
    """Token ids the document builders need."""

    bos_id: int
    eos_id: int
    pad_id: int
    begin_of_image_id: int
    end_of_image_id: int
    image_placeholder_id: int


# Files one of which a tokenizer folder must hold: the fast tokenizer (what data_tools writes and
# the releases ship), or a slow tokenizer's vocabulary.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
# Every file of a tokenizer folder whose content can change the token ids (the vocabulary, the
# merges, the special and added tokens): what a build fingerprints to know its tokenizer again.
TOKENIZER_CONTENT_FILES = TOKENIZER_FILES + (
    "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def load_tokenizer(path: str):
    """``AutoTokenizer`` from a local directory (refuses anything that is not a directory).

    A folder without a tokenizer raises ``FileNotFoundError`` ("DIR: no tokenizer (tokenizer.json)"),
    one whose files cannot be read a one-line ``ValueError`` naming the file when it can be told.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"tokenizer path {path!r} is not a local directory (hub ids are not loaded at run time)"
        )
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path}: no tokenizer ({TOKENIZER_FILES[0]})")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # transformers and tokenizers raise anything from OSError to a bare Exception
        raise ValueError(_unloadable(path, err)) from None


def _unloadable(path: str, err: Exception) -> str:
    """One line saying why the tokenizer in ``path`` cannot be loaded, naming the file when known."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        try:
            with open(file, encoding="utf-8") as f:
                json.load(f)
        except (ValueError, UnicodeDecodeError) as bad:  # JSONDecodeError is a ValueError
            return f"{file}: not valid JSON ({str(bad).splitlines()[0]}): re-create or re-download the tokenizer"
    first_line = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    reason = f"{type(err).__name__}: {first_line}" if first_line else type(err).__name__
    return f"{path}: the tokenizer cannot be loaded ({reason}): re-create or re-download it"


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
