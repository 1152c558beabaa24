"""launch.sh on a real one-node SLURM cluster (Debian's slurmctld, slurmd, munge), started here.

The cluster is private to this module (scripts/slurm_cluster.sh in a temporary directory) and is
stopped afterwards. Without the SLURM packages the tests fail under CI (CI=...) and skip elsewhere:
    apt-get install -y slurmctld slurmd slurm-client munge
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.launch_helpers import REPO, child_env

# Multi-process or multi-run end-to-end tests: outside the quick lane (pytest -m "not slow").
pytestmark = pytest.mark.slow

CLUSTER_SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
BINARIES = ("munged", "slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scontrol", "scancel", "srun")
INSTALL = "apt-get install -y slurmctld slurmd slurm-client munge"


def _missing_binaries() -> list[str]:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [b for b in BINARIES if shutil.which(b, path=path) is None]


@dataclass
class Cluster:
    dir: Path
    conf: str

    def env(self) -> dict[str, str]:
        # A clean environment for sbatch (it hands it to the job): no SLURM_* from an enclosing
        # job, this cluster's config, and the Python that runs these tests.
        env = {k: v for k, v in child_env().items() if not k.startswith(("SLURM_", "JANUSFLOW_"))}
        env.update(SLURM_CONF=self.conf, JANUSFLOW_PYTHON=sys.executable)
        return env

    def run(self, *cmd: str, timeout: float = 30, check: bool = True, cwd: Path | None = None):
        proc = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout, cwd=cwd)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}{self.logs()}")
        return proc

    def sbatch(self, *args: str, cwd: Path) -> str:
        # sbatch's working directory is the job's SLURM_SUBMIT_DIR.
        return self.run("sbatch", "--parsable", *args, timeout=30, cwd=cwd).stdout.strip().split(";")[0]

    def queued(self, job: str) -> bool:
        """Pending, running, completing or requeued: anything but finished."""
        out = self.run("squeue", "-h", "-j", job, "-o", "%T", check=False).stdout.strip()
        return bool(out)

    def job(self, job: str) -> dict[str, str]:
        out = self.run("scontrol", "-o", "show", "job", job).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def wait_gone(self, job: str, timeout: float, log: Path) -> None:
        deadline = time.monotonic() + timeout
        while self.queued(job):
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job} still queued after {timeout:.0f} s\n{tail(log)}{self.logs()}")
            time.sleep(1)

    def cancel(self, job: str) -> None:
        if self.queued(job):
            self.run("scancel", job, check=False)

    def logs(self) -> str:
        return "".join(f"\n--- {name} ---\n{tail(self.dir / 'log' / name, 15)}"
                       for name in ("slurmctld.log", "slurmd.log"))


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"({path} does not exist)\n"
    return "\n".join(text[-lines:]) + "\n"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = _missing_binaries()
    if missing:
        message = f"SLURM is not installed (missing {', '.join(missing)}); install it with: {INSTALL}"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    state = tmp_path_factory.mktemp("slurm")
    start = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start", str(state)], capture_output=True,
                           text=True, timeout=120)
    if start.returncode != 0:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop", str(state)], capture_output=True, timeout=120)
        pytest.fail(f"scripts/slurm_cluster.sh start failed:\n{start.stderr}", pytrace=False)
    cluster = Cluster(dir=state, conf=start.stdout.strip().splitlines()[-1])
    try:
        yield cluster
    finally:
        stop = subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop", str(state)], capture_output=True,
                              text=True, timeout=120)
        assert stop.returncode == 0, stop.stderr


def _metric_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


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
        assert _metric_steps(run_dir) == [1, 2, 3], tail(log)
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
        while len(_metric_steps(run_dir)) < 3:
            assert cluster.queued(job), f"job ended before training started\n{tail(log)}"
            assert time.monotonic() < deadline, f"no 3 steps logged in 240 s\n{tail(log)}{cluster.logs()}"
            time.sleep(0.25)
        cluster.run("scancel", "--signal=USR1", "--batch", job)

        cluster.wait_gone(job, timeout=300, log=log)
        info = cluster.job(job)
        text = log.read_text(errors="replace")
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{tail(log)}"
        assert int(info["Restarts"]) >= 1, f"job was not requeued: {info}\n{tail(log)}"

        saved = re.search(r"\[train\] stop requested(?: \([^)]*\))?: saving step_(\d+)", text)
        resumed = re.search(r"\[train\] resumed from \S+/step_(\d+) at step (\d+)", text)
        assert saved and resumed, tail(log)
        stop_step = int(saved.group(1))
        assert int(resumed.group(1)) == int(resumed.group(2)) == stop_step >= 3, tail(log)
        assert f"[launch] job {job} start 1:" in text and f"[launch] job {job} start 2:" in text, tail(log)
        assert text.index("stop requested") < text.index("requeueing") < text.index("resumed from"), tail(log)
        # Metrics continue past the checkpoint: every step once, none repeated, up to the end.
        assert _metric_steps(run_dir) == list(range(1, steps + 1)), tail(log)
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{steps:08d}"
    finally:
        cluster.cancel(job)
