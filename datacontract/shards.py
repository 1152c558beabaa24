"""Reading packed-sequence shards (the Arrow IPC files written by ``python -m data_tools build``).

Layout of a build's output root (``format.py`` defines the columns of one packed sequence)::

    ROOT/manifest.json          what was built: shards per task, counts, fill, checksums, command
    ROOT/rejects.jsonl          one line per rejected input record: source, key, reason
    ROOT/{und,gen,text}/shard-NNNNN.arrow

Each task directory holds the packed sequences whose *primary* task is that task. Understanding and
generation sequences may end with short text documents cut from the text stream ("fillers") so that
no token slot is wasted; ``doc_tasks`` says which document is which.

The schema metadata of every shard repeats the few numbers a reader needs to interpret the payloads
(image resolution, tokens per image, latent shape and dtype), so a shard can be read on its own.
This module is shared by the offline tools (``stats``/``inspect``/``verify``) and the loader.
"""

from __future__ import annotations

import io
import json
import os
import stat
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa

from .format import (
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
)

MANIFEST_NAME = "manifest.json"
# The ``format`` of the manifests this module reads (``data_tools.build.FORMAT_VERSION`` writes it).
MANIFEST_FORMAT = "janusflow-packed/1"
REJECTS_NAME = "rejects.jsonl"
# Provenance of each document ("source:key", "@start" for a piece of a split text document). Not part
# of the model contract: readers that do not know it ignore it.
COL_DOC_KEYS = "doc_keys"
TASK_DIRS = {Task.UNDERSTANDING: "und", Task.GENERATION: "gen", Task.TEXT: "text"}
TASK_BY_NAME = {name: task for task, name in TASK_DIRS.items()}
FAMILIES = ("janusflow", "januspro")  # as ``model.family``


def packed_schema(with_latents: bool, metadata: Optional[dict] = None) -> pa.Schema:
    """Arrow schema of a packed shard; ``metadata`` values are JSON-encoded into the schema."""
    fields = [
        pa.field(COL_INPUT_IDS, pa.list_(pa.int32())),
        pa.field(COL_TOKEN_KIND, pa.list_(pa.uint8())),
        pa.field(COL_TARGET_MASK, pa.list_(pa.uint8())),
        pa.field(COL_DOC_LENGTHS, pa.list_(pa.int32())),
        pa.field(COL_DOC_TASKS, pa.list_(pa.uint8())),
        pa.field(COL_UND_IMAGES, pa.list_(pa.binary())),
        pa.field(COL_GEN_IMAGES, pa.list_(pa.binary())),
    ]
    if with_latents:
        fields.append(pa.field(COL_GEN_LATENTS, pa.list_(pa.binary())))
        fields.append(pa.field(COL_GEN_LATENT_DTYPE, pa.string()))
    fields.append(pa.field(COL_DOC_KEYS, pa.list_(pa.string())))
    meta = {k: json.dumps(v, sort_keys=True) for k, v in (metadata or {}).items()}
    return pa.schema(fields, metadata=meta)


@dataclass(frozen=True)
class ShardLayout:
    """The numbers stored in a shard's schema metadata (``janusflow.layout``).

    ``family``: the model family the documents are laid out for (``format.py``): "janusflow"
    (time token + latent slots) or "januspro" (image codes in ``input_ids``). For Janus-Pro,
    ``gen_tokens_per_image`` is the number of codes per image, ``pad_id`` the token that replaces a
    dropped prompt (classifier-free guidance) and ``image_codec`` the codec's ``describe()`` (kind,
    codebook_size, downsample, fingerprint). Shards written before these fields read as JanusFlow.
    """

    seq_length: int
    resolution: int
    und_tokens_per_image: int
    gen_tokens_per_image: int
    latent_shape: Optional[tuple]  # (C, h, w) when the shards hold latents
    latent_dtype: Optional[str]
    family: str = "janusflow"
    pad_id: Optional[int] = None
    image_codec: Optional[dict] = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"shard layout: unknown family {self.family!r}; one of {', '.join(FAMILIES)}")

    @property
    def code_grid(self) -> Optional[tuple]:
        """(h, w) of a generation image's codes (Janus-Pro), None without an image codec."""
        if not self.image_codec:
            return None
        side = self.resolution // int(self.image_codec["downsample"])
        return (side, side)

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["latent_shape"] = list(self.latent_shape) if self.latent_shape else None
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ShardLayout":
        shape = d.get("latent_shape")
        pad = d.get("pad_id")
        return cls(
            seq_length=int(d["seq_length"]),
            resolution=int(d["resolution"]),
            und_tokens_per_image=int(d["und_tokens_per_image"]),
            gen_tokens_per_image=int(d["gen_tokens_per_image"]),
            latent_shape=tuple(shape) if shape else None,
            latent_dtype=d.get("latent_dtype"),
            family=d.get("family", "janusflow"),
            pad_id=None if pad is None else int(pad),
            image_codec=d.get("image_codec"),
        )


LAYOUT_KEY = "janusflow.layout"


class ShardError(ValueError):
    """A manifest or shard that cannot be trained on; the message names the file and what to do."""


def _rebuild_hint(root: str) -> str:
    return f"`python -m data_tools verify {root}` lists what is wrong; rebuild the shards"


def read_manifest(root: str) -> dict:
    path = os.path.join(root, MANIFEST_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {root!r} the output root of a finished build?")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_manifest(root: str, manifest) -> None:
    """The parts of a manifest the trainer relies on (``ShardError`` naming the entry otherwise): the
    format this module reads, and per task a list of shards, each a file inside ``root`` (a path out
    of it would train on another build's data) with whole-number ``rows`` and ``bytes``."""
    where = os.path.join(root, MANIFEST_NAME)
    if not isinstance(manifest, dict):
        raise ShardError(f"{where}: not a manifest (a JSON {type(manifest).__name__}); rebuild the shards")
    fmt = manifest.get("format")
    if fmt != MANIFEST_FORMAT:
        raise ShardError(f"{where}: format {fmt!r}, this trainer reads {MANIFEST_FORMAT!r}; rebuild the shards with "
                         "this checkout's `python -m data_tools build`")
    tasks = manifest.get("tasks")
    if not isinstance(tasks, dict) or set(tasks) - set(TASK_BY_NAME):
        raise ShardError(f"{where}: 'tasks' must map {', '.join(TASK_BY_NAME)} to their shards, got "
                         f"{sorted(tasks) if isinstance(tasks, dict) else type(tasks).__name__}; rebuild the shards")
    seen = {}
    real_root = os.path.realpath(root)
    for name, entry in tasks.items():
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list):
            raise ShardError(f"{where}: tasks.{name}.shards must be a list; rebuild the shards")
        for i, shard in enumerate(shards):
            key = f"tasks.{name}.shards[{i}]"
            path = shard.get("path") if isinstance(shard, dict) else None
            if not isinstance(path, str) or not path or "\0" in path:
                raise ShardError(f"{where}: {key}.path must be a file name, got {path!r}; rebuild the shards")
            full = os.path.realpath(os.path.join(root, path))
            if os.path.isabs(path) or os.path.commonpath([real_root, full]) != real_root:
                raise ShardError(f"{where}: {key}.path {path!r} is outside {root}; a build lists only its own "
                                 "shards: rebuild the shards")
            if full in seen:
                raise ShardError(f"{where}: {key} lists {path!r} again (also {seen[full]}); rebuild the shards")
            seen[full] = key
            for field in ("rows", "bytes"):
                if not _whole(shard.get(field)):
                    raise ShardError(f"{where}: {key}.{field} must be a whole number >= 0, got "
                                     f"{shard.get(field)!r}; rebuild the shards")
            if shard["rows"] > shard["bytes"]:  # a row takes bytes: a count no file can hold
                raise ShardError(f"{where}: {key} says {shard['rows']} rows in {shard['bytes']} bytes; rebuild the "
                                 "shards")


def check_shard_files(root: str, manifest: dict, tasks) -> None:
    """Every shard of ``tasks`` is a readable file of the size the manifest records (one ``stat``
    each: a deleted, truncated or swapped shard fails here, before training, not when it is reached)."""
    for task in tasks:
        entry = manifest["tasks"].get(TASK_DIRS[task], {"shards": []})
        for shard in entry["shards"]:
            path = os.path.join(root, shard["path"])
            try:
                st = os.stat(path)
            except OSError as err:
                raise ShardError(f"{path}: listed in the manifest but {(err.strerror or str(err)).lower()}; "
                                 f"{_rebuild_hint(root)}") from None
            if not stat.S_ISREG(st.st_mode):
                raise ShardError(f"{path}: not a file; {_rebuild_hint(root)}")
            if st.st_size != shard["bytes"]:
                raise ShardError(f"{path}: {st.st_size} bytes, the manifest says {shard['bytes']} (cut short or "
                                 f"replaced); {_rebuild_hint(root)}")
            if not os.access(path, os.R_OK):
                raise ShardError(f"{path}: not readable by this user; fix its permissions")


class ShardReader:
    """Random access to the rows of one packed shard, memory-mapped (zero copy until a row is read).

    ``rows`` / ``layout``: what the manifest says the shard holds; given, a shard that holds
    something else (another row count, layout or schema) raises ``ShardError``."""

    def __init__(self, path: str, rows: Optional[int] = None, layout: Optional["ShardLayout"] = None) -> None:
        self.path = path
        try:
            self._source = pa.memory_map(path, "r")
            reader = pa.ipc.open_file(self._source)
            self.table = reader.read_all()
            # Decoded here, once: a damaged byte in the footer's column names or metadata fails in
            # pyarrow's own UTF-8 decoding wherever they are first read.
            self.table.schema.names
            meta = self.table.schema.metadata or {}
        except (OSError, pa.ArrowException, UnicodeDecodeError) as err:
            raise ShardError(f"{path}: not a readable shard ({type(err).__name__}: {err}); rebuild the shards"
                             ) from None
        try:
            raw = meta.get(LAYOUT_KEY.encode())
            self.layout = ShardLayout.from_json(json.loads(raw)) if raw else None
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise ShardError(f"{path}: its layout metadata cannot be read ({type(err).__name__}: {err}); "
                             "rebuild the shards") from None
        if rows is not None or layout is not None:
            self._check(rows, layout)

    def _check(self, rows: Optional[int], layout: Optional["ShardLayout"]) -> None:
        expected = packed_schema(COL_GEN_LATENTS in self.table.schema.names)
        wrong = [f.name for f in expected if f.name != COL_DOC_KEYS and (
            f.name not in self.table.schema.names or self.table.schema.field(f.name).type != f.type)]
        if wrong:
            raise ShardError(f"{self.path}: not a packed shard (columns {', '.join(wrong)} missing or of another "
                             "type); rebuild the shards")
        if rows is not None and self.table.num_rows != rows:
            raise ShardError(f"{self.path}: {self.table.num_rows} rows, the manifest says {rows} (a shard of "
                             "another build?); rebuild the shards")
        if layout is not None and self.layout is not None and self.layout != layout:
            raise ShardError(f"{self.path}: written for another layout than the manifest's (a shard of another "
                             "build?); rebuild the shards")

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def read_row(self, index: int) -> dict:
        """One packed sequence as a dict of python lists / bytes, columns as in ``format.py``."""
        if not 0 <= index < self.table.num_rows:
            raise IndexError(f"row {index} out of range for {self.path} ({self.table.num_rows} rows)")
        return self.table.slice(index, 1).to_pylist()[0]

    def close(self) -> None:
        self._source.close()


def decode_image(data: bytes, resolution: Optional[int] = None) -> np.ndarray:
    """Encoded image bytes (as stored) -> uint8 array [H, W, 3]. With ``resolution``, an image of
    another size, or bytes that do not decode, raise ``ValueError`` (the size is read from the
    header, before any pixel is decoded)."""
    from PIL import Image

    if resolution is None:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as err:  # PIL raises many types for bytes that are no image
        raise ValueError(f"bytes that are no image ({type(err).__name__})") from None
    with img:
        if img.size != (resolution, resolution):
            raise ValueError(f"a {img.size[0]}x{img.size[1]} image, the layout has {resolution}x{resolution}")
        try:
            return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
        except Exception as err:
            raise ValueError(f"an image that does not decode ({type(err).__name__}: {err})") from None


def decode_latent(data: bytes, dtype: str, shape: tuple) -> np.ndarray:
    """Raw little-endian float16/bfloat16 bytes -> float32 array of ``shape``."""
    if dtype == "float16":
        arr = np.frombuffer(data, dtype="<f2").astype(np.float32)
    elif dtype == "bfloat16":
        # bfloat16 is the upper half of a float32: shift the 16 bits into place.
        raw = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        arr = raw.view(np.float32)
    else:
        raise ValueError(f"unknown latent dtype {dtype!r}: expected 'float16' or 'bfloat16'")
    expected = int(np.prod(shape))
    if arr.size != expected:
        raise ValueError(f"latent has {arr.size} values, shape {tuple(shape)} needs {expected}")
    return arr.reshape(shape)


def encode_latent(values: np.ndarray, dtype: str) -> bytes:
    """float32 array -> raw little-endian float16/bfloat16 bytes (bf16 rounds to nearest even)."""
    x = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "float16":
        return x.astype("<f2").tobytes()
    if dtype == "bfloat16":
        bits = x.view(np.uint32).astype(np.uint64)
        rounding = ((bits >> 16) & 1) + 0x7FFF
        out = ((bits + rounding) >> 16).astype("<u2")
        nan = np.isnan(x)
        if nan.any():
            out[nan] = 0x7FC0
        return out.tobytes()
    raise ValueError(f"unknown latent dtype {dtype!r}: expected 'float16' or 'bfloat16'")


def shard_paths(root: str, manifest: dict, task: Task) -> list:
    """Paths of a task's shards, in manifest order, with their row counts (``check_manifest`` first
    for a manifest that may be damaged)."""
    entry = manifest["tasks"].get(TASK_DIRS[task], {"shards": []})
    return [(os.path.join(root, s["path"]), int(s["rows"])) for s in entry["shards"]]
