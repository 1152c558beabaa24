"""launch.sh without a cluster: syntax, usage, and what the local path hands to torchrun."""

import os
import subprocess
from pathlib import Path

import pytest

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


def _recorder(path: Path, record: Path) -> Path:
    """A stand-in executable that writes its arguments to ``record``, one a line."""
    path.write_text(f'#!/bin/sh\nprintf "%s\\n" "$(basename "$0")" "$@" > "{record}"\n')
    path.chmod(0o755)
    return path


TINY = "recipes/tiny_cpu.yaml"
NPROC = "expected a whole number of processes per node, at least 1"


# Each refused before any command is built, with one line and exit 2 (never requeued under sbatch).
# Before: a torchrun command with the bad value (exit 1 from torchrun, requeued up to 3 times), a bash
# "unbound variable" line, or a silent fallback to another checkout or Python.
@pytest.mark.parametrize("args, env, says", [
    (["--nproc"], {}, "--nproc needs a number of processes per node, e.g. --nproc 8"),
    (["--recipe", TINY, "--nproc", "abc"], {}, f"--nproc 'abc': {NPROC}"),
    (["--nproc", "0", "--recipe", TINY], {}, f"--nproc '0': {NPROC}"),
    (["--nproc=", "--recipe", TINY], {}, f"--nproc '': {NPROC}"),
    (["--nproc", "99999999999", "--recipe", TINY], {}, f"--nproc '99999999999': {NPROC}"),
    (["--steps", "3"], {}, "--recipe is required, e.g. --recipe recipes/stage2.yaml (see launch.sh --help)"),
    (["--steps", "3", "--recipe"], {}, "--recipe needs a path, e.g. --recipe recipes/stage2.yaml"),
    (["--recipe", "missing.yaml"], {},
     f"--recipe 'missing.yaml' is not a file (a relative path starts at the repository, {REPO})"),
    (["--recipe", "recipes"], {},
     f"--recipe 'recipes' is not a file (a relative path starts at the repository, {REPO})"),
    (["--recipe", TINY], {"JANUSFLOW_PYTHON": "/nonexistent/python"},
     "JANUSFLOW_PYTHON=/nonexistent/python is not an executable (give the project's Python)"),
    (["--recipe", TINY], {"JANUSFLOW_HOME": "/nonexistent"},
     "JANUSFLOW_HOME=/nonexistent is not the repository (no launch.sh and pretrain/ in it)"),
    (["--recipe", TINY], {"JANUSFLOW_MASTER_PORT": "abc"},
     "JANUSFLOW_MASTER_PORT=abc: expected a port number from 1 to 65535"),
    (["--recipe", TINY], {"JANUSFLOW_MASTER_PORT": "70000"},
     "JANUSFLOW_MASTER_PORT=70000: expected a port number from 1 to 65535"),
    (["--recipe", TINY], {"JANUSFLOW_MAX_RESTARTS": "three"},
     "JANUSFLOW_MAX_RESTARTS=three: expected a whole number of restarts (default 3)"),
])
def test_refuses_bad_arguments_and_settings_with_one_line(tmp_path: Path, args, env, says):
    record, bin_dir = tmp_path / "argv", tmp_path / "bin"
    bin_dir.mkdir()
    # Whatever Python the launcher would start (its default fallback included) only records that it ran.
    fake = _recorder(bin_dir / "python3", record)
    env = {"JANUSFLOW_PYTHON": str(fake), **env, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(LAUNCH), *args], cwd=tmp_path, env=_env(**env),
                          capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stderr, proc.stdout) == (2, f"launch.sh: error: {says}\n", "")
    assert not record.exists()


STEP_ENV = {"SLURM_JOB_ID": "12", "SLURM_STEP_ID": "0"}
NOT_A_STEP = ("this is not a SLURM job step (submit with sbatch, or unset SLURM_JOB_ID and SLURM_STEP_ID to run"
              " on this machine alone)")
STALE = "(unset SLURM_JOB_ID and SLURM_STEP_ID to run on this machine alone)"


# A stale or copied SLURM_* environment (a shell inside an allocation, a container, a hand-made test):
# before, bash's "SLURM_NNODES: unbound variable", scontrol's own errors with exit 1, or, for a job id
# "abc", a port computed from 0.
@pytest.mark.parametrize("env, says", [
    (STEP_ENV, f"SLURM_STEP_NUM_NODES/SLURM_NNODES='' is not a node count: {NOT_A_STEP}"),
    ({**STEP_ENV, "SLURM_NNODES": "2"}, f"SLURM_PROCID='' is not a node rank below 2: {NOT_A_STEP}"),
    ({**STEP_ENV, "SLURM_NNODES": "2", "SLURM_PROCID": "2"},
     f"SLURM_PROCID='2' is not a node rank below 2: {NOT_A_STEP}"),
    ({**STEP_ENV, "SLURM_NNODES": "2", "SLURM_PROCID": "1"},
     f"neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set: {NOT_A_STEP}"),
    ({**STEP_ENV, "SLURM_NNODES": "2", "SLURM_PROCID": "1", "SLURM_JOB_NODELIST": "n[1-2]"},
     f"scontrol cannot expand the node list 'n[1-2]': {NOT_A_STEP}"),
    ({**STEP_ENV, "SLURM_JOB_ID": "abc"}, f"SLURM_JOB_ID=abc is not a SLURM job id {STALE}"),
    ({"SLURM_JOB_ID": "12 13"}, f"SLURM_JOB_ID=12 13 is not a SLURM job id {STALE}"),
    ({"SLURM_JOB_ID": "12", "SLURM_RESTART_COUNT": "x"}, f"SLURM_RESTART_COUNT=x is not a count of restarts {STALE}"),
    ({"SLURM_JOB_ID": "12", "SLURM_JOB_NUM_NODES": "0"}, f"SLURM_JOB_NUM_NODES=0 is not a node count {STALE}"),
])
def test_refuses_a_slurm_environment_that_is_not_a_job_step_with_one_line(tmp_path: Path, env, says):
    record, bin_dir = tmp_path / "argv", tmp_path / "bin"
    bin_dir.mkdir()
    fake = _recorder(bin_dir / "python3", record)
    for tool in ("srun", "scontrol"):  # a machine that is no SLURM node: its tools fail
        (bin_dir / tool).write_text("#!/bin/sh\necho 'fatal: no configuration' >&2\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    env = {"JANUSFLOW_PYTHON": str(fake), **env, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(LAUNCH), "--recipe", TINY], cwd=tmp_path, env=_env(**env),
                          capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stderr, proc.stdout) == (2, f"launch.sh: error: {says}\n", "")
    assert not record.exists()


def test_a_zero_padded_slurm_number_is_decimal(tmp_path: Path):
    """`$(( ))` reads 08 as a bad octal number and 010 as 8: SLURM's numbers are decimal."""
    record, bin_dir = tmp_path / "argv", tmp_path / "bin"
    bin_dir.mkdir()
    fake = _recorder(tmp_path / "python", record)
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$2" = hostnames ] && echo n1\nexit 0\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = _env(JANUSFLOW_PYTHON=str(fake), SLURM_JOB_ID="020008", SLURM_STEP_ID="0", SLURM_NNODES="1",
               SLURM_PROCID="0", SLURM_JOB_NODELIST="n1", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(LAUNCH), "--nproc", "2", "--recipe", TINY], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "--master_port=29508" in record.read_text().splitlines()  # 29500 + 20008 % 20000
    batch = _env(JANUSFLOW_PYTHON=str(fake), SLURM_JOB_ID="12", SLURM_RESTART_COUNT="08",
                 PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    _recorder(bin_dir / "srun", record)
    proc = subprocess.run(["bash", str(LAUNCH), "--recipe", TINY], cwd=tmp_path, env=batch,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "[launch] job 12 start 9: 1 node(s)" in proc.stdout


def test_nproc_equals_form_is_the_launchers(tmp_path: Path):
    record = tmp_path / "argv"
    fake = _recorder(tmp_path / "python", record)
    proc = subprocess.run(["bash", str(LAUNCH), "--nproc=3", "--recipe", TINY], cwd=tmp_path,
                          env=_env(JANUSFLOW_PYTHON=str(fake)), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert record.read_text().splitlines()[1:] == ["-m", "torch.distributed.run", "--standalone",
                                                   "--nproc_per_node=3", "-m", "pretrain.main", "--recipe", TINY]


def test_recipe_path_with_shell_metacharacters_passes_through_verbatim(tmp_path: Path):
    """Locally and from a batch script (a stand-in srun), the path reaches the command as one argument."""
    recipe = tmp_path / "a b;$(id)`id`*'\"&|.yaml"
    recipe.write_text((REPO / TINY).read_text())
    record, bin_dir = tmp_path / "argv", tmp_path / "bin"
    bin_dir.mkdir()
    fake = _recorder(tmp_path / "python", record)
    _recorder(bin_dir / "srun", record)
    args = ["--recipe", str(recipe), "--set", "train.output_dir=/tmp/x y"]
    proc = subprocess.run(["bash", str(LAUNCH), "--nproc", "2", *args], cwd=tmp_path,
                          env=_env(JANUSFLOW_PYTHON=str(fake)), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert record.read_text().splitlines()[-len(args):] == args
    batch = _env(JANUSFLOW_PYTHON=str(fake), SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="1",
                 PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(LAUNCH), "--nproc", "2", *args], cwd=tmp_path, env=batch,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    lines = record.read_text().splitlines()
    assert lines[0] == "srun" and lines[-len(args) - 4:] == ["bash", str(LAUNCH), "--nproc", "2", *args]
