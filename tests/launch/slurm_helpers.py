"""A private SLURM cluster (scripts/slurm_cluster.sh) for the launcher tests, and reading what a job left.

Without the SLURM packages the tests that use it fail under CI (CI=...) and skip elsewhere; a machine
that cannot host the cluster at all (the script's exit status 3: not root, no network namespaces)
skips them with the script's reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from tests.launch_helpers import REPO, child_env

CLUSTER_SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
BINARIES = ("munged", "slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scontrol", "scancel", "srun")
INSTALL = "apt-get install -y slurmctld slurmd slurm-client munge"
UNAVAILABLE = 3  # scripts/slurm_cluster.sh: this machine cannot host the cluster


def _missing_binaries() -> list[str]:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [b for b in BINARIES if shutil.which(b, path=path) is None]


@dataclass
class Cluster:
    dir: Path
    conf: str
    # Client commands go through `slurm_cluster.sh exec DIR`: on a two-node cluster they run on node1,
    # the only place slurmctld can be reached from.
    prefix: list[str] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        # A clean environment for sbatch (it hands it to the job): no SLURM_* from an enclosing
        # job, this cluster's config, and the Python that runs these tests.
        env = {k: v for k, v in child_env().items() if not k.startswith(("SLURM_", "JANUSFLOW_"))}
        env.update(SLURM_CONF=self.conf, JANUSFLOW_PYTHON=sys.executable)
        return env

    def run(self, *cmd: str, timeout: float = 30, check: bool = True, cwd: Path | None = None):
        proc = subprocess.run([*self.prefix, *cmd], env=self.env(), capture_output=True, text=True,
                              timeout=timeout, cwd=cwd)
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
        return "".join(f"\n--- {path.name} ---\n{tail(path, 15)}" for path in sorted((self.dir / "log").glob("slurm*.log")))


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"({path} does not exist)\n"
    return "\n".join(text[-lines:]) + "\n"


@contextmanager
def private_cluster(state: Path, nodes: int = 1) -> Iterator[Cluster]:
    """Starts the cluster in ``state`` (skipping or failing the tests when it cannot), stops it after."""
    missing = _missing_binaries()
    if missing:
        message = f"SLURM is not installed (missing {', '.join(missing)}); install it with: {INSTALL}"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    script = ["bash", str(CLUSTER_SCRIPT)]
    start = subprocess.run([*script, "start", str(state), "--nodes", str(nodes)], capture_output=True, text=True,
                           timeout=120)
    if start.returncode == UNAVAILABLE:
        pytest.skip(start.stderr.strip())
    if start.returncode != 0:
        subprocess.run([*script, "stop", str(state)], capture_output=True, timeout=120)
        pytest.fail(f"scripts/slurm_cluster.sh start failed:\n{start.stderr}", pytrace=False)
    prefix = [*script, "exec", str(state)] if nodes > 1 else []
    try:
        yield Cluster(dir=state, conf=start.stdout.strip().splitlines()[-1], prefix=prefix)
    finally:
        stop = subprocess.run([*script, "stop", str(state)], capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stderr


def metric_rows(run_dir: Path) -> list[dict]:
    """Every row of the run's metrics.jsonl in order (a step redone after a crash appears twice)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def metric_steps(run_dir: Path) -> list[int]:
    return [row["step"] for row in metric_rows(run_dir)]
