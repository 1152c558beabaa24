"""Runs of the tiny Janus-Pro recipe for the multi-process tests: one process (this one) or torchrun."""

import json
import subprocess

from tests.launch_helpers import run_main

RECIPE = "recipes/tiny_januspro_cpu.yaml"


def train_run(out, steps: int, nproc: int, *overrides: str) -> subprocess.CompletedProcess:
    """``steps`` optimizer steps of the tiny Janus-Pro recipe into ``out`` (``nproc`` > 1: torchrun; 1: in
    this process)."""
    sets = [a for o in (f"train.output_dir={out}", *overrides) for a in ("--set", o)]
    proc = run_main(nproc, "--recipe", RECIPE, "--steps", str(steps), *sets)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def run_metrics(out) -> dict[int, dict]:
    """The run's metrics.jsonl by step."""
    return {json.loads(l)["step"]: json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()}
