"""The DeepSpeed trainer end to end on CPU: resume equals an uninterrupted run (2 ranks, ZeRO-2),
SIGTERM checkpoints and exits, NaN steps are skipped and stop the run after the limit."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch_helpers import REPO, child_env, copy_run_at, run_main
from tests.train.tiny_runs import STRAIGHT_STEPS, two_rank_cmd

# Multi-process or multi-run end-to-end tests: outside the quick lane (pytest -m "not slow").
pytestmark = pytest.mark.slow

RECIPE = "recipes/tiny_cpu.yaml"


def _train(out: Path, nproc: int, steps: int, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    sets = [a for o in (f"train.output_dir={out}", "parallel.global_batch_size=4", "train.save_interval=2",
                        "train.keep_last=5", *overrides) for a in ("--set", o)]
    proc = run_main(nproc, "--recipe", RECIPE, "--steps", str(steps), *sets)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _metrics(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows}


def test_resumed_run_equals_uninterrupted_run(two_rank_straight_run, tmp_path):
    # The uninterrupted run (2 ranks, ZeRO-2) is the session's shared one (tests/train/conftest.py).
    # The resumed run starts from a copy of the straight run's step-2 checkpoint (as after a crash
    # there) rather than from a second 2-rank launch up to step 2.
    straight = two_rank_straight_run
    resumed = copy_run_at(straight, tmp_path / "resumed", 2)
    assert f"resumed from {resumed / 'checkpoints' / 'step_00000002'}" in _run_two_ranks(resumed, 4).stdout
    a, b = _metrics(straight), _metrics(resumed)
    assert sorted(a) == list(range(1, STRAIGHT_STEPS + 1)) and sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("loss/total", "loss/ar", "loss/rf", "loss/repa", "grad_norm"):
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])
    # The model learned something and all objectives were seen on the 2 ranks.
    assert all(a[s]["loss/ar"] > 0 and a[s]["loss/rf"] > 0 for s in a)
    assert (straight / "tensorboard").is_dir()
    assert all(a[s]["perf/tflops_per_gpu"] > 0 and a[s]["memory/peak_gb"] > 0 for s in a)


def _run_two_ranks(out: Path, steps: int) -> subprocess.CompletedProcess:
    proc = subprocess.run(two_rank_cmd(out, steps), cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pretrain.main", "--recipe", RECIPE, "--steps", "1000",
           "--set", f"train.output_dir={out}", "--set", "train.save_interval=1000", "--set", "optim.steps=1000"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-3000:]
    assert "stop requested" in output
    tag = (out / "checkpoints" / "latest").read_text().strip()
    last_step = max(_metrics(out))
    assert tag == f"step_{last_step:08d}" and (out / "checkpoints" / tag / "COMPLETE").exists()


def test_nan_steps_are_skipped_then_the_run_stops(tmp_path):
    out = tmp_path / "nan"
    # An absurd learning rate: the first update sends the weights to ~1e30, after which every
    # forward overflows and every gradient is NaN/Inf. Those steps must be skipped, not applied.
    proc = _train(out, 1, 10, "optim.lr=1e30", "train.max_consecutive_skipped_steps=3", check=False)
    assert proc.returncode != 0
    assert "3 consecutive steps had a NaN/Inf" in proc.stdout + proc.stderr
    rows = _metrics(out)
    assert [rows[s]["skipped_steps"] for s in sorted(rows)] == [0.0, 1.0, 2.0, 3.0]
