"""Offline image tokenization of generation images into the discrete codes Janus-Pro models.

The codec (``image_codecs.load_image_codec``: the VQ-16 tokenizer, or the k-means patch codec for
CPU runs) is frozen; the build runs it once per generation image, batched, on a GPU when there is one
(``device="auto"``), and stores the codes in the document's ``input_ids`` (``format.py``). The
manifest records the codec's ``describe()``; a resumed build whose codec changed is refused like one
whose input files changed (``state.describe_changes``).
"""

from __future__ import annotations

from typing import List

import numpy as np


class CodeEncoder:
    def __init__(self, kind: str, path: str, device: str = "auto", batch_size: int = 64,
                 threads: int = 0) -> None:
        import torch

        from image_codecs import load_image_codec

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if threads:  # one of several CPU workers: do not oversubscribe the cores
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.codec = load_image_codec(kind, path, self.device)
        # NaN/inf centroids (a damaged k-means fit) load, but every patch would then get the same
        # arbitrary code and the shards would look fine: refuse them before any image is encoded.
        # (VQ-16 weights are checked by their loader.)
        centroids = getattr(self.codec, "centroids", None)
        if centroids is not None and not bool(torch.isfinite(centroids).all()):
            raise ValueError(f"{path}: the codec's centroids hold NaN or inf values: the codebook is damaged; "
                             "fit it again with `python -m data_tools fit-codec`")

    def describe(self) -> dict:
        return self.codec.describe()

    def encode(self, images: List[np.ndarray]) -> List[np.ndarray]:
        """uint8 [R, R, 3] images -> int32 codes [(R/d)^2] each (row-major), batched."""
        torch = self.torch
        out: List[np.ndarray] = []
        for i in range(0, len(images), self.batch_size):
            batch = np.stack(images[i : i + self.batch_size])
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(self.device, torch.float32)
            x = x / 127.5 - 1.0  # == (x / 255 - 0.5) / 0.5, as the loader and the released processor
            with torch.no_grad():
                codes = self.codec.encode(x).cpu().numpy()
            out.extend(c.astype(np.int32) for c in codes)
        return out
