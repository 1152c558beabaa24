"""Runs that several tests under tests/train compare against, made once per test session."""

from __future__ import annotations

import fcntl
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.launch_helpers import REPO, child_env
from tests.train.tiny_runs import STRAIGHT_STEPS, two_rank_cmd


def _session_dir(request, tmp_path_factory) -> Path:
    """A folder of this test session that its pytest-xdist workers share (each worker's own base
    folder sits inside it), so a run that test files on both workers need is made once, not once per
    worker. Without xdist: the session's own base folder."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if hasattr(request.config, "workerinput") else base


@pytest.fixture(scope="session")
def two_rank_straight_run(request, tmp_path_factory) -> Path:
    """The uninterrupted 2-rank tiny run (tests/train/tiny_runs.py) of STRAIGHT_STEPS steps: the
    reference of the resumed run (test_trainer.py), of the run that loses a rank (test_stalled_rank.py)
    and the start of the universal conversion (test_universal.py). Read only: tests copy what they change.

    The first worker to need it makes it while holding a lock; the other waits for it (its core left
    to the run) instead of making its own. Each attempt writes a folder of its own, named in DONE
    once it succeeded: a failed attempt leaves no DONE, so the next worker tries again (and reports
    its own failure), and ranks of a timed-out attempt that outlive it write nowhere that is used."""
    shared = _session_dir(request, tmp_path_factory) / "two_rank_straight"
    shared.mkdir(exist_ok=True)
    done = shared / "DONE"
    with open(shared / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this worker dies
        if not done.exists():
            out = Path(tempfile.mkdtemp(prefix="attempt_", dir=shared)) / "run"
            proc = subprocess.run(two_rank_cmd(out, STRAIGHT_STEPS), cwd=REPO, env=child_env(), capture_output=True,
                                  text=True, timeout=600)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
            (shared / "DONE.tmp").write_text(str(out))
            (shared / "DONE.tmp").rename(done)  # whole or absent
        return Path(done.read_text())


@pytest.fixture
def make_trainer(runtime, tmp_path):
    """In-process trainers of the tiny recipe (no sample grid, global batch 2), closed after the test:
    ``make_trainer(*overrides, out=folder)``; without ``out`` each gets a new folder under tmp_path."""
    # Imported here: the other fixtures of this folder start child processes and need none of it.
    from pretrain.recipe import load_recipe
    from pretrain.train.trainer import Trainer

    made = []

    def make(*overrides: str, out: Path | None = None) -> Trainer:
        out = out or tmp_path / f"run{len(made)}"
        recipe = load_recipe(REPO / "recipes" / "tiny_cpu.yaml", [f"train.output_dir={out}", "train.image_interval=0",
                                                                 "parallel.global_batch_size=2", *overrides])
        trainer = Trainer(recipe)
        made.append(trainer)
        return trainer

    yield make
    for trainer in made:
        trainer.close()
