"""One rank of a 2-process run stops (SIGSTOP: a stuck filesystem, a dead node): the run ends within
the configured time with the watchdog's message instead of hanging, and the requeued run resumes
from the last checkpoint exactly as an uninterrupted run continues."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pretrain.train.watchdog import EXIT_CODE
from tests.launch_helpers import REPO, child_env
from tests.train.tiny_runs import STRAIGHT_STEPS, two_rank_cmd

STEPS = STRAIGHT_STEPS


def _cmd(out: Path) -> list[str]:
    # The shared straight run's settings, with its 1-minute collective timeout.
    return two_rank_cmd(out, STEPS)


def _metrics(out: Path) -> dict[int, dict]:
    path = out / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {row["step"]: row for row in rows}


def _rank_pid(out: Path, rank: int) -> int:
    """The pid of the training process of ``rank`` whose command line names ``out``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(out) in cmdline and "pretrain/main.py" in cmdline and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no process of rank {rank} for {out}")


@pytest.mark.slow
def test_a_stopped_rank_ends_the_run_which_then_resumes_exactly(two_rank_straight_run, tmp_path):
    # The uninterrupted run is the session's shared one (tests/train/conftest.py).
    straight, stalled = two_rank_straight_run, tmp_path / "stalled"

    proc = subprocess.Popen(_cmd(stalled), cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    victim = None
    try:
        deadline = time.time() + 300
        while time.time() < deadline and len(_metrics(stalled)) < 3 and proc.poll() is None:
            time.sleep(0.2)
        assert len(_metrics(stalled)) >= 3
        victim = _rank_pid(stalled, 1)
        os.kill(victim, signal.SIGSTOP)
        stopped_at = time.time()
        output, _ = proc.communicate(timeout=300)
        took = time.time() - stopped_at
    finally:
        if victim is not None:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    # The watchdog of the waiting rank fires at 0.8 x the 1-minute collective timeout.
    assert "[watchdog] rank 0: step" in output and f"Exiting with code {EXIT_CODE}" in output, output[-4000:]
    assert took < 150, took
    assert len(_metrics(stalled)) < STEPS

    # The requeued run resumes from the last checkpoint and continues as the straight run did.
    again = subprocess.run(_cmd(stalled), cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout
    a, b = _metrics(straight), _metrics(stalled)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        for key in ("loss/total", "loss/ar", "loss/rf", "loss/repa", "grad_norm"):
            assert a[step][key] == b[step][key], (step, key)
