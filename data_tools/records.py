"""The records every input reader yields, and the options and work units they share.

``sources`` (tars, parquet, LLaVA JSON, text jsonl) and ``class_sources`` (class-labelled image
folders and tars) both yield ``RawRecord``s or ``Reject``s for the ``Chunk``s the build plans.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import List, Optional

from datacontract.format import Task

FORMATS = ("wds", "parquet", "llava", "jsonl", "classdir", "classwds")
TAR_FORMATS = ("wds", "classwds")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")


@dataclass(frozen=True)
class InputSpec:
    fmt: str  # one of FORMATS
    task: Task
    pattern: str  # glob or path
    image_root: Optional[str] = None  # llava: folder the "image" paths are relative to


@dataclass(frozen=True)
class Chunk:
    """Records [start, stop) of one input file (for tars: the whole file, start=stop=0)."""

    index: int
    fmt: str
    task: Task
    path: str
    start: int
    stop: int
    byte_offset: int = 0  # jsonl: where line `start` begins
    image_root: Optional[str] = None


@dataclass
class RawRecord:
    source: str
    key: str
    task: Task
    images: List[bytes] = field(default_factory=list)
    caption: Optional[str] = None  # caption (understanding answer) or prompt (generation)
    turns: Optional[List[tuple]] = None  # llava: [(question, answer), ...] with image markers
    text: Optional[str] = None  # text-only document


@dataclass
class Reject:
    source: str
    key: str
    reason: str
    detail: str = ""

    def to_json(self) -> dict:
        return {"source": self.source, "key": self.key, "reason": self.reason, "detail": self.detail}


@dataclass(frozen=True)
class ReaderOptions:
    """Field and column names (all are CLI options)."""

    wds_caption_ext: str = "txt"
    json_caption_field: str = "caption"
    parquet_image_column: str = "image"
    parquet_caption_column: str = "caption"
    parquet_key_column: Optional[str] = None
    text_field: str = "text"
    llava_image_field: str = "image"
    llava_conversations_field: str = "conversations"
    image_marker: str = "<image>"
    max_member_bytes: int = 64 << 20  # a tar member or LLaVA image file above this is rejected unread
    # Class-labelled images (``class_sources``): the tar member / json field holding the class, and
    # the class names ({folder or class id: name}, from --class-names; None: the folder's name).
    wds_class_ext: str = "cls"
    json_class_field: str = "label"
    class_names: Optional[dict] = None


def json_member_field(members: dict, name: str, source: str, key: str):
    """Field ``name`` of a tar key group's ``.json`` member (None when absent), or a ``Reject``."""
    try:
        meta = json.loads(members["json"].decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as e:
        return Reject(source, key, "malformed_json", str(e))
    return meta.get(name) if isinstance(meta, dict) else None
