"""Runs that several tests under tests/train compare against, made once per session."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.launch_helpers import REPO, child_env
from tests.train.tiny_runs import STRAIGHT_STEPS, two_rank_cmd


@pytest.fixture(scope="session")
def two_rank_straight_run(tmp_path_factory) -> Path:
    """The uninterrupted 2-rank tiny run (tests/train/tiny_runs.py) of STRAIGHT_STEPS steps: the
    reference of the resumed run (test_trainer.py) and of the run that loses a rank (test_stalled_rank.py)."""
    out = tmp_path_factory.mktemp("two_rank_straight") / "run"
    done = subprocess.run(two_rank_cmd(out, STRAIGHT_STEPS), cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return out
