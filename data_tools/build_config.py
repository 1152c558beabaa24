"""The options of one ``data_tools build`` run (``cli.py`` fills them from the command line), and
which of them make its output: ``identity()``, compared when a build resumes or is re-run."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import List, Optional

from datacontract.format import Task
from datacontract.tokenizer import DEFAULT_BEGIN_OF_IMAGE, DEFAULT_END_OF_IMAGE, DEFAULT_IMAGE_PLACEHOLDER

from .documents import LayoutOptions
from .sources import InputSpec, ReaderOptions


@dataclass
class BuildConfig:
    out: str
    inputs: List[InputSpec]
    tokenizer: str
    layout: LayoutOptions = field(default_factory=LayoutOptions)
    reader: ReaderOptions = field(default_factory=ReaderOptions)
    begin_of_image: str = DEFAULT_BEGIN_OF_IMAGE
    end_of_image: str = DEFAULT_END_OF_IMAGE
    image_placeholder: str = DEFAULT_IMAGE_PLACEHOLDER
    pad_token: Optional[str] = None
    chunk_records: int = 10000
    shard_rows: int = 256
    pack_window: int = 5000
    text_fillers: bool = True
    min_filler: int = 16
    text_reserve: float = 0.2  # share of the text tokens fillers leave to text sequences
    vae: Optional[str] = None
    vae_device: str = "auto"
    vae_compute_dtype: str = "float32"
    latent_dtype: str = "float16"
    vae_batch_size: int = 16
    family: str = "janusflow"  # "januspro": generation images as codes of ``codec`` (``format.py``)
    codec: Optional[str] = None  # image_codecs kind: vq16 | kmeans_patches
    codec_path: Optional[str] = None
    codec_device: str = "auto"
    codec_batch_size: int = 64
    # Not part of the output's identity:
    workers: int = 1
    quiet: bool = False
    keep_work: bool = False
    overwrite: bool = False
    command: List[str] = field(default_factory=list)
    debug_kill_after: Optional[int] = None  # tests: SIGKILL itself after this many units of work
    debug_kill_worker: Optional[str] = None  # tests: "chunk:N" / "shard:N" (once) or "...:always"
    log_every: float = 30.0  # seconds between progress lines when stderr is not a terminal

    def identity(self) -> dict:
        """Everything that determines the output bytes (compared on resume)."""
        skip = {"out", "workers", "quiet", "keep_work", "overwrite", "command", "debug_kill_after",
                "debug_kill_worker", "log_every", "codec_device", "codec_batch_size"}
        d = {k: v for k, v in asdict(self).items() if k not in skip}
        d["inputs"] = [
            {"fmt": s.fmt, "task": Task(s.task).name, "pattern": s.pattern, "image_root": s.image_root}
            for s in self.inputs
        ]
        return json.loads(json.dumps(d, sort_keys=True))
