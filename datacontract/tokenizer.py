"""Tokenizers as both sides see them: load one from a local directory and resolve its special tokens.

Only local paths are ever loaded (no hub access at run time). ``TokenSpec`` resolves the special
tokens that the document layouts of ``datacontract.format`` need and fails early, naming the option
to set, when the tokenizer lacks one. (Building a small tokenizer offline is a data tool:
``data_tools.tokenizer``.)
"""

from __future__ import annotations

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
