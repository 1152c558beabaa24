"""launch.sh without a cluster: syntax, usage, and what the local path hands to torchrun."""

import subprocess
from pathlib import Path

from tests.launch_helpers import REPO, child_env

LAUNCH = REPO / "launch.sh"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in child_env().items() if not k.startswith(("SLURM_", "JANUSFLOW_"))}
    env.update(extra)
    return env


def test_syntax():
    subprocess.run(["bash", "-n", str(LAUNCH)], check=True, timeout=30)


def test_no_arguments_prints_usage_and_fails():
    proc = subprocess.run(["bash", str(LAUNCH)], env=_env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "sbatch" in proc.stderr and "--recipe" in proc.stderr


def test_local_run_passes_recipe_and_overrides_through(tmp_path: Path):
    # A stand-in Python that records its arguments: the local path must start torchrun with them.
    record = tmp_path / "argv"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\necho "cwd=$PWD" >> {record}\n')
    fake.chmod(0o755)
    args = ["--recipe", "recipes/tiny_cpu.yaml", "--steps", "3", "--set", "train.output_dir=/tmp/a b",
            "--set", "optim.lr=1e-4"]
    proc = subprocess.run(["bash", str(LAUNCH), "--nproc", "2", *args], cwd=tmp_path,
                          env=_env(JANUSFLOW_PYTHON=str(fake)), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "[launch] local, 2 processes" in proc.stdout
    lines = record.read_text().splitlines()
    assert lines[:-1] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "pretrain.main", *args]
    assert lines[-1] == f"cwd={REPO}"  # relative recipe paths are the repository's
