"""Logging behind a small interface: TensorBoard on rank 0, a do-nothing stand-in elsewhere."""

from __future__ import annotations

import json
from pathlib import Path


class NullMonitor:
    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardMonitor(NullMonitor):
    """TensorBoard event files under ``output_dir/tensorboard`` and the same scalars as JSON lines in
    ``output_dir/metrics.jsonl`` (one object per step, appended across resumes: easy to diff)."""

    def __init__(self, output_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        output_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        self.jsonl = open(output_dir / "metrics.jsonl", "a")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        self.writer.close()
        self.jsonl.close()
