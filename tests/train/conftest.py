"""Runs that several tests under tests/train compare against, made once per test session."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.launch_helpers import REPO, child_env
from tests.train.tiny_runs import STRAIGHT_STEPS, two_rank_cmd


def _session_dir(tmp_path_factory) -> Path:
    """A folder of this test session that its pytest-xdist workers share (each worker's own base
    folder sits inside it), so a run that test files on both workers need is made once, not once per worker."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def two_rank_straight_run(tmp_path_factory) -> Path:
    """The uninterrupted 2-rank tiny run (tests/train/tiny_runs.py) of STRAIGHT_STEPS steps: the
    reference of the resumed run (test_trainer.py), of the run that loses a rank (test_stalled_rank.py)
    and the start of the universal conversion (test_universal.py). Read only: tests copy what they change.

    The first worker to need it makes it while holding a lock; the other waits for it (with its core
    free for the run) instead of making its own. A failed run leaves no DONE mark, so the next
    worker tries again and reports its own failure."""
    shared = _session_dir(tmp_path_factory) / "two_rank_straight"
    shared.mkdir(exist_ok=True)
    out, done = shared / "run", shared / "DONE"
    with open(shared / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this worker dies
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            proc = subprocess.run(two_rank_cmd(out, STRAIGHT_STEPS), cwd=REPO, env=child_env(), capture_output=True,
                                  text=True, timeout=600)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
            done.write_text("ok\n")
    return out
