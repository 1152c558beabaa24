"""launch.sh on a real two-node SLURM cluster: node1 and node2 are network namespaces of this machine,
each with its own slurmd (scripts/slurm_cluster.sh start DIR --nodes 2), so the two training processes
talk over the namespaces' addresses exactly as over a network.

The reference is the same recipe as a plain 2-process torchrun on this machine: a job that spans
the nodes, is pre-empted or loses a node must log the very same per-step metrics. Skipped with the
script's reason where namespaces cannot be made (not root, a container without CAP_SYS_ADMIN).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.launch.slurm_helpers import metric_rows, metric_steps, private_cluster, tail
from tests.launch_helpers import REPO, child_env, torchrun_cmd

pytestmark = pytest.mark.slow

RECIPE = "recipes/tiny_cpu.yaml"
STEPS = 60  # ~0.1 s each: long enough to pre-empt or kill the job mid-run
SAVE_INTERVAL = 5
COMPARED = ("loss/total", "loss/ar", "loss/rf", "loss/repa", "grad_norm", "lr")


def _overrides(run_dir: Path) -> list[str]:
    sets = (f"train.output_dir={run_dir}", f"optim.steps={STEPS}", "parallel.global_batch_size=4",
            f"train.save_interval={SAVE_INTERVAL}", "train.image_interval=0", "train.collective_timeout_minutes=1")
    return [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with private_cluster(tmp_path_factory.mktemp("slurm2"), nodes=2) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory) -> dict[int, dict]:
    """Per-step metrics of the uninterrupted run on one machine (torchrun, 2 processes, gloo)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    done = subprocess.run(torchrun_cmd(2, REPO / "pretrain" / "main.py", "--recipe", RECIPE, *_overrides(run_dir)),
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert metric_steps(run_dir) == list(range(1, STEPS + 1))
    return {row["step"]: row for row in metric_rows(run_dir)}


def _submit(cluster, tmp_path: Path) -> tuple[str, Path, Path]:
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = cluster.sbatch("--nodes=2", "--ntasks-per-node=1", f"--output={log}", f"--chdir={REPO}", "--time=60",
                         str(REPO / "launch.sh"), "--recipe", RECIPE, *_overrides(run_dir), cwd=REPO)
    return job, run_dir, log


# Generous bounds: each start spends most of its time importing torch and DeepSpeed, several times
# longer when the 2 cores are shared (measured: 45 s alone, over 4 minutes at load 20).
def _wait_for(condition, what: str, cluster, job: str, log: Path, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert cluster.queued(job), f"job ended before {what}\n{tail(log)}"
        assert time.monotonic() < deadline, f"no {what} in {timeout:.0f} s\n{tail(log)}{cluster.logs()}"
        time.sleep(0.2)


def _assert_matches_reference(run_dir: Path, reference: dict[int, dict], log: Path) -> None:
    """Every step 1..STEPS logged, and the last time each was logged it equals the reference exactly:
    the resumed run continues bit for bit (2 ranks, same reduction order in gloo locally and across
    the namespaces: the measured difference is 0)."""
    final = {row["step"]: row for row in metric_rows(run_dir)}
    assert sorted(final) == list(range(1, STEPS + 1)), tail(log)
    for step in range(1, STEPS + 1):
        for key in COMPARED:
            assert final[step][key] == reference[step][key], (step, key, final[step][key], reference[step][key])


def _node_job_pids(cluster, node: str) -> list[int]:
    """The job's processes on ``node`` (launcher, torchrun, trainer): everything in its namespace but
    the SLURM daemons."""
    netns = dict(line.split() for line in (cluster.dir / "netns").read_text().splitlines())[node]
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, check=True).stdout.split()
    job_pids = []
    for pid in map(int, pids):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if name not in ("slurmd", "slurmstepd"):
            job_pids.append(pid)
    return job_pids


def _kill_node_job(cluster, node: str) -> None:
    victims = _node_job_pids(cluster, node)
    assert victims, f"no job processes on {node}"
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _latest_step(run_dir: Path) -> int:
    latest = run_dir / "checkpoints" / "latest"
    return int(latest.read_text().strip().removeprefix("step_")) if latest.exists() else 0


def test_two_node_job_survives_preemption_and_a_killed_node_with_the_uninterrupted_metrics(
        cluster, reference, tmp_path):
    """One job, three starts (one scenario rather than two jobs: each start costs ~45 s of imports).

    1. sbatch --nodes=2: one launcher per node, each in its own namespace, rendezvous at node1's
       NodeAddr: a 2-process world across the nodes.
    2. The pre-emption warning (SIGUSR1 to the batch shell): both ranks save a stop checkpoint, the
       job requeues itself and the second start resumes from it.
    3. kill -9 of every job process on node2 once the second start has saved a checkpoint: the job
       ends well within the collective timeout (1 minute here) with srun naming node2, requeues itself
       (launch.sh's failure policy) and the third start resumes from that checkpoint.
    The final metrics of every step equal the uninterrupted local run's.
    """
    job, run_dir, log = _submit(cluster, tmp_path)
    text = lambda: log.read_text(errors="replace")  # noqa: E731
    try:
        _wait_for(lambda: len(metric_steps(run_dir)) >= 3, "3 steps logged", cluster, job, log)
        cluster.run("scancel", "--signal=USR1", "--batch", job)
        _wait_for(lambda: "[train] resumed from" in text(), "resume after the pre-emption", cluster, job, log)
        resumed_at = int(re.search(r"\[train\] resumed from \S+/step_(\d+)", text()).group(1))
        _wait_for(lambda: _latest_step(run_dir) > resumed_at, "checkpoint after the resume", cluster, job, log)
        _kill_node_job(cluster, "node2")
        killed_at = time.monotonic()
        _wait_for(lambda: "[launch] the training step failed" in text(), "failure line", cluster, job, log)
        took = time.monotonic() - killed_at
        cluster.wait_gone(job, timeout=900, log=log)
        info, out = cluster.job(job), text()
    finally:
        cluster.cancel(job)

    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{tail(log)}"
    assert int(info["Restarts"]) == 2, f"{info}\n{tail(log)}"
    for start in (1, 2, 3):
        assert f"[launch] job {job} start {start}: 2 node(s) x 1 processes" in out, tail(log)
    # One launcher per node, each in its own namespace, meeting at node1's address (its NodeAddr).
    for node in ("0/2 (node1)", "1/2 (node2)"):
        assert len(re.findall(rf"\[launch\] node {re.escape(node)}, 1 processes, master node1 \(10\.213\.0\.1:\d+\)",
                              out)) == 3, tail(log)
    assert out.count("[train] world 2 (tp 1, pp 1, dp 2)") == 3, tail(log)

    # Pre-emption: saved where it stopped, resumed exactly there.
    saved = re.search(r"\[train\] stop requested \(SIGUSR1\): saving step_(\d+)", out)
    resumes = [(int(a), int(b)) for a, b in re.findall(r"\[train\] resumed from \S+/step_(\d+) at step (\d+)", out)]
    stop_lines = re.findall(r"\[train\] stop requested.*", out)
    assert saved, f"no stop line naming SIGUSR1; stop lines: {stop_lines}\n{tail(log)}"
    assert len(resumes) == 2, f"resumes: {resumes}\n{tail(log)}"
    stop_step, (kill_resume, _) = int(saved.group(1)), resumes[1]
    assert resumes[0] == (stop_step, stop_step) and stop_step >= 3, tail(log)
    assert out.index("stop requested") < out.index("checkpointed; requeueing") < out.index("resumed from"), tail(log)

    # The killed node: srun names it, the job ends within the collective timeout and says it requeues.
    assert "srun: error: node2: task 1: Killed" in out, tail(log)
    assert took < 60, f"the job took {took:.0f} s to end after node2's processes died\n{tail(log)}"
    assert f"requeueing job {job} (restart 2 of at most 3), which resumes from latest" in out, tail(log)
    assert resumes[1] == (kill_resume, kill_resume) and kill_resume > stop_step, tail(log)
    assert kill_resume % SAVE_INTERVAL == 0, tail(log)

    # Every step logged once up to the kill, then again from the checkpoint it resumed from (steps
    # between that checkpoint and the kill are redone), and each step's last row is the reference's.
    steps = metric_steps(run_dir)
    redo = next((i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]), len(steps))
    assert steps[:redo] == list(range(1, redo + 1)), steps
    assert steps[redo:] == list(range(kill_resume + 1, STEPS + 1))[:len(steps) - redo], steps
    _assert_matches_reference(run_dir, reference, log)
