"""Runs of the tiny Janus-Pro recipe for the multi-process tests: one process or torchrun."""

import json
import subprocess
import sys

from tests.launch_helpers import REPO, child_env, torchrun_cmd

RECIPE = "recipes/tiny_januspro_cpu.yaml"


def train_run(out, steps: int, nproc: int, *overrides: str) -> subprocess.CompletedProcess:
    """``steps`` optimizer steps of the tiny Janus-Pro recipe into ``out`` (``nproc`` > 1: torchrun)."""
    sets = [a for o in (f"train.output_dir={out}", *overrides) for a in ("--set", o)]
    args = ["--recipe", RECIPE, "--steps", str(steps), *sets]
    cmd = (torchrun_cmd(nproc, REPO / "pretrain" / "main.py", *args) if nproc > 1
           else [sys.executable, "-m", "pretrain.main", *args])
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def run_metrics(out) -> dict[int, dict]:
    """The run's metrics.jsonl by step."""
    return {json.loads(l)["step"]: json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()}
