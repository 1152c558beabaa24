"""launch.sh on a real one-node SLURM cluster (Debian's slurmctld, slurmd, munge), started here.

The cluster is private to this module (scripts/slurm_cluster.sh in a temporary directory) and is
stopped afterwards. Without the SLURM packages the tests fail under CI (CI=...) and skip elsewhere:
    apt-get install -y slurmctld slurmd slurm-client munge
Two nodes: tests/launch/test_slurm_two_nodes.py.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.launch.slurm_helpers import metric_steps, private_cluster, tail
from tests.launch_helpers import REPO

# Multi-process or multi-run end-to-end tests: outside the quick lane (pytest -m "not slow").
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with private_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def test_batch_job_trains_tiny_recipe_with_two_tasks(cluster, tmp_path):
    """sbatch --ntasks-per-node=2: one launcher on the node, torchrun starts a world of 2."""
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    # Submitted from the repository: launch.sh finds it through SLURM_SUBMIT_DIR.
    job = cluster.sbatch(
        "--nodes=1", "--ntasks-per-node=2", f"--output={log}", f"--chdir={REPO}", "--time=10",
        str(REPO / "launch.sh"), "--recipe", "recipes/tiny_cpu.yaml", "--steps", "3",
        "--set", f"train.output_dir={run_dir}", "--set", "parallel.global_batch_size=4",
        cwd=REPO,
    )
    try:
        cluster.wait_gone(job, timeout=300, log=log)
        info = cluster.job(job)
        text = log.read_text(errors="replace")
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{tail(log)}"
        assert "[launch] node 0/1" in text and ", 2 processes" in text, tail(log)
        assert "[train] world 2 (tp 1, pp 1, dp 2)" in text, tail(log)
        assert metric_steps(run_dir) == [1, 2, 3], tail(log)
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    finally:
        cluster.cancel(job)


def test_preempted_job_checkpoints_requeues_and_resumes(cluster, tmp_path):
    """The pre-emption warning (SIGUSR1 to the batch shell, as --signal=B:USR1@120 sends it):
    the trainer saves and exits, the job requeues itself and its next start resumes from latest."""
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    steps = 40
    # Submitted from elsewhere: launch.sh finds the repository through the job's command path.
    job = cluster.sbatch(
        "--nodes=1", "--ntasks-per-node=2", f"--output={log}", f"--chdir={tmp_path}", "--time=10",
        str(REPO / "launch.sh"), "--recipe", "recipes/tiny_cpu.yaml",
        "--set", f"optim.steps={steps}", "--set", "train.save_interval=1000",
        "--set", f"train.output_dir={run_dir}", "--set", "parallel.global_batch_size=4",
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 240
        while len(metric_steps(run_dir)) < 3:
            assert cluster.queued(job), f"job ended before training started\n{tail(log)}"
            assert time.monotonic() < deadline, f"no 3 steps logged in 240 s\n{tail(log)}{cluster.logs()}"
            time.sleep(0.25)
        cluster.run("scancel", "--signal=USR1", "--batch", job)

        cluster.wait_gone(job, timeout=300, log=log)
        info = cluster.job(job)
        text = log.read_text(errors="replace")
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{tail(log)}"
        assert int(info["Restarts"]) >= 1, f"job was not requeued: {info}\n{tail(log)}"

        saved = re.search(r"\[train\] stop requested \(SIGUSR1\): saving step_(\d+)", text)
        resumed = re.search(r"\[train\] resumed from \S+/step_(\d+) at step (\d+)", text)
        assert saved and resumed, tail(log)
        stop_step = int(saved.group(1))
        assert int(resumed.group(1)) == int(resumed.group(2)) == stop_step >= 3, tail(log)
        assert f"[launch] job {job} start 1:" in text and f"[launch] job {job} start 2:" in text, tail(log)
        assert text.index("stop requested") < text.index("requeueing") < text.index("resumed from"), tail(log)
        # Metrics continue past the checkpoint: every step once, none repeated, up to the end.
        assert metric_steps(run_dir) == list(range(1, steps + 1)), tail(log)
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{steps:08d}"
    finally:
        cluster.cancel(job)
