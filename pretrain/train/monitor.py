"""Logging behind a small interface: TensorBoard on rank 0, a do-nothing stand-in elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

import torch


class NullMonitor:
    # Whether anything logged here is kept: callers skip work whose only use is a log (decoding
    # the sample grid's images) where it is not.
    records = False

    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardMonitor(NullMonitor):
    """TensorBoard event files under ``output_dir/tensorboard`` and the same scalars as JSON lines in
    ``output_dir/metrics.jsonl`` (one object per step, appended across resumes: easy to diff).
    Images go to TensorBoard and, for a look without it, to ``output_dir/samples/step_NNNNNNN.png``."""

    records = True

    def __init__(self, output_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        output_dir.mkdir(parents=True, exist_ok=True)
        self.output_dir = output_dir
        self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        self.jsonl = open(output_dir / "metrics.jsonl", "a")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        """``image``: [3, H, W] float in [0, 1]. One image per step (the PNG is named by the step)."""
        from ..sample.decode import save_png

        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an image [3, H, W], got {tuple(image.shape)}")
        image = image.detach().float().cpu().clamp(0, 1)
        self.writer.add_image(tag, image, step, dataformats="CHW")
        self.writer.flush()
        save_png(image[None], [self.output_dir / "samples" / f"step_{step:07d}.png"])

    def close(self) -> None:
        self.writer.close()
        self.jsonl.close()
