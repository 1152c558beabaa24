"""The 2-rank run of the tiny JanusFlow recipe that the resume tests compare against (made once per
session by the ``two_rank_straight_run`` fixture in tests/train/conftest.py), its command, and the
export of a run's weights that the parity tests compare."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from pretrain.export import main as export_main
from tests.launch_helpers import REPO, torchrun_cmd

RECIPE = "recipes/tiny_cpu.yaml"
STRAIGHT_STEPS = 6
# ZeRO-2 (partitioned gradients and optimizer state) so that resuming restores every partition. The
# 1-minute collective timeout changes no number; it lets the stalled-rank test end within a minute.
TWO_RANK_OVERRIDES = ("parallel.global_batch_size=4", "parallel.zero_stage=2", "train.save_interval=2",
                      "train.keep_last=5", "train.image_interval=0", "train.collective_timeout_minutes=1")


def two_rank_cmd(out: Path, steps: int) -> list[str]:
    """torchrun, 2 processes, ``steps`` steps of the tiny recipe into ``out`` (optim.steps stays 20: a
    shorter run is a prefix of a longer one)."""
    sets = [a for o in (f"train.output_dir={out}", *TWO_RANK_OVERRIDES) for a in ("--set", o)]
    return torchrun_cmd(2, REPO / "pretrain" / "main.py", "--recipe", RECIPE, "--steps", str(steps), *sets)


def export_weights(run: Path, out: Path, weights: str = "raw") -> dict:
    """The run's latest ``weights`` (raw or ema) in our names, exported to ``out`` and read back. In
    this process: a child would spend most of its time importing torch and DeepSpeed."""
    assert export_main(["--run", str(run), "--weights", weights, "--format", "ours", "--out", str(out)]) == 0
    return load_file(str(out))
