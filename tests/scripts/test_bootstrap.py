"""scripts/bootstrap.sh keeps pip's output off the console and still says what failed.

A stand-in for the environment's python records each pip call: the real installs take minutes and
the network; what is tested here is the script's handling of pip's output and exit status.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for .venv/bin/python: `-c` (the script's checks that the environment is usable) succeeds
# unless UNUSABLE is set (or, for the check for pip, NO_PIP); `-m pip install ...` prints like pip on a host with a stale index setting,
# and fails when FAIL_ON is one of its arguments.
if [ "$1" = -c ]; then
  [ -z "${UNUSABLE:-}" ] && [ -z "${PYTHONHOME:-}" ] || exit 1  # a real Python fails to start with a bad PYTHONHOME
  case "$2" in *find_spec*) [ -z "${NO_PIP:-}" ]; exit $? ;; esac
  exit 0
fi
echo "$*" >> "$(dirname "$0")/../calls"
echo "WARNING: Location 'file:///opt/pypi/simple/x/' is ignored: it is neither a file nor a directory." >&2
echo "Successfully installed something"
for arg in "$@"; do
  if [ -n "${FAIL_ON:-}" ] && [ "$arg" = "$FAIL_ON" ]; then
    echo "ERROR: No matching distribution found for $arg" >&2
    exit 1
  fi
done
"""


# Stands in for the Python that makes the environment (PYTHON): its version is VERSION (3.11 unless
# set); `-m venv [--clear] DIR` is recorded in DIR/../made and leaves DIR a fake environment.
FAKE_MAKER = """#!/usr/bin/env bash
if [ "$1" = -c ]; then
  case "$2" in
    *platform*) echo "${VERSION:-3.11.7}" ;;
    *) [ "${VERSION:-3.11.7}" != 3.9.18 ]; exit $? ;;
  esac
  exit 0
fi
dir="${@: -1}"
echo "$*" >> "$(dirname "$dir")/made"
[ "$3" = --clear ] && rm -rf "${dir:?}"  # dot files (the stamp) too, as venv does
mkdir -p "$dir/bin" && touch "$dir/pyvenv.cfg"
cp "$(dirname "$0")/fake-venv-python" "$dir/bin/python"
"""


def _fake_maker(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "maker"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("python3", FAKE_MAKER), ("fake-venv-python", FAKE_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir / "python3"


def _bootstrap(tmp_path: Path, *args: str, venv_made: bool = True, **env) -> subprocess.CompletedProcess:
    """bootstrap.sh with ``args`` (its set: run or test) and ``env`` added to the environment;
    ``venv_made``: the environment exists already (a fake one), else only what the test left there."""
    venv = tmp_path / "venv"
    if venv_made:
        (venv / "bin").mkdir(parents=True, exist_ok=True)
        (venv / "pyvenv.cfg").touch()
        python = venv / "bin" / "python"
        python.write_text(FAKE_PYTHON)
        python.chmod(0o755)
    env = {"PYTHON": str(_fake_maker(tmp_path)), **env}
    return subprocess.run(["bash", str(REPO / "scripts" / "bootstrap.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, "JANUSFLOW_VENV": str(venv), **env}, timeout=60)


def _calls(tmp_path: Path) -> list[str]:
    """The fake pip's calls so far, one line each."""
    calls = tmp_path / "venv" / "calls"
    return calls.read_text().splitlines() if calls.exists() else []


def test_pip_output_goes_to_the_log_and_the_console_gets_one_line_per_stage(tmp_path):
    done = _bootstrap(tmp_path)
    assert done.returncode == 0, done.stderr
    console = (done.stdout + done.stderr).splitlines()
    assert console and all(line.startswith("[bootstrap] ") for line in console), console
    log = (tmp_path / "venv" / "bootstrap.log").read_text()
    assert "WARNING: Location" in log and "Successfully installed" in log
    calls = _calls(tmp_path)
    assert calls[0] == "-m pip install --upgrade pip" and calls[-1] == "-m pip install -e .[test]"
    assert (tmp_path / "venv" / ".janusflow-installed").exists()
    # Unchanged setup.py: the second run installs nothing.
    again = _bootstrap(tmp_path)
    assert again.returncode == 0 and again.stdout == again.stderr == ""
    assert _calls(tmp_path) == calls


def test_a_failed_install_names_the_log_shows_its_end_and_writes_no_stamp(tmp_path):
    done = _bootstrap(tmp_path, FAIL_ON=".[test]")
    assert done.returncode == 1
    log = tmp_path / "venv" / "bootstrap.log"
    assert f"pip install -e .[test] failed; the end of its output (all of it: {log}):" in done.stderr
    assert "ERROR: No matching distribution found for .[test]" in done.stderr
    assert not (tmp_path / "venv" / ".janusflow-installed").exists()


def test_the_run_set_leaves_out_the_test_tools_and_test_adds_them_once(tmp_path):
    done = _bootstrap(tmp_path, "run")
    assert done.returncode == 0, done.stderr
    assert _calls(tmp_path)[-1] == "-m pip install -e ."
    assert "with the test tools" not in done.stdout
    # run again: installed, nothing to do
    assert _bootstrap(tmp_path, "run").stdout == ""
    n = len(_calls(tmp_path))
    # the test set on a run install: this package again with its test extra
    done = _bootstrap(tmp_path, "test")
    assert done.returncode == 0 and "with the test tools and Triton" in done.stdout
    assert _calls(tmp_path)[n:][-1] == "-m pip install -e .[test]"
    n = len(_calls(tmp_path))
    # the larger set covers the smaller one, and the default is the test set
    for args in (["run"], ["test"], []):
        again = _bootstrap(tmp_path, *args)
        assert again.returncode == 0 and again.stdout == again.stderr == "", args
    assert len(_calls(tmp_path)) == n


def test_a_stamp_from_before_the_sets_counts_as_the_test_set(tmp_path):
    assert _bootstrap(tmp_path).returncode == 0
    stamp = tmp_path / "venv" / ".janusflow-installed"
    stamp.write_text(stamp.read_text().split()[0] + "\n")  # the older format: the hash alone
    n = len(_calls(tmp_path))
    assert _bootstrap(tmp_path, "test").stdout == "" and len(_calls(tmp_path)) == n


def test_an_unknown_set_is_refused_with_the_names_that_exist(tmp_path):
    done = _bootstrap(tmp_path, "tests")
    assert done.returncode == 2 and not _calls(tmp_path)
    assert done.stderr.strip() == ("[bootstrap] unknown set 'tests': use run (training, sampling, the demo) "
                                   "or test (also the tests)")


def test_training_sampling_and_the_demo_import_without_triton():
    """What `bootstrap.sh run` installs has no Triton: the run's modules import without it, and the
    kernels stay on their PyTorch references on the CPU (a forced Triton backend says what to do)."""
    script = r'''
import importlib.abc, sys
class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NoTriton())
import torch
import pretrain.demo, pretrain.evaluate, pretrain.main, pretrain.sample.text_to_image, pretrain.train.trainer
import data_tools.build
from fused_kernels import dispatch
assert not dispatch.triton_available()
assert not dispatch.use_triton(torch.zeros(1))
dispatch.set_kernel_backend("triton")
try:
    dispatch.use_triton(torch.zeros(1))
except RuntimeError as err:
    print(err)
print(sorted(m for m in sys.modules if m.split(".")[0] == "triton"))
'''
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-2:] == [
        "kernel backend 'triton' was requested but triton is not installed: pip install triton (CUDA builds "
        "of torch bring it), or train.kernels=auto", "[]"]


def _made(tmp_path: Path) -> list[str]:
    made = tmp_path / "made"
    return made.read_text().splitlines() if made.exists() else []


def test_an_environment_that_cannot_run_is_made_again_then_installed(tmp_path):
    """Its Python removed (a pyenv version uninstalled), older than 3.10, or without pip (a venv
    half made where ensurepip is missing): each was a pip failure on every run, or venv's own
    "[Errno 2] No such file or directory" when it tried to create the folder again."""
    assert _bootstrap(tmp_path).returncode == 0
    done = _bootstrap(tmp_path, venv_made=False, UNUSABLE="1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"[bootstrap] {tmp_path / 'venv'} is not usable (its Python is missing or older "
                                  "than 3.10, or pip cannot be put in): making it again\n")
    assert _made(tmp_path) == [f"-m venv --clear {tmp_path / 'venv'}"]
    assert _calls(tmp_path)[-1] == "-m pip install -e .[test]"  # the stamp went with the old environment


@pytest.mark.parametrize("present", ["nothing", "empty folder"])
def test_a_missing_environment_is_created(tmp_path, present):
    if present == "empty folder":
        (tmp_path / "venv").mkdir()
    done = _bootstrap(tmp_path, venv_made=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"[bootstrap] creating {tmp_path / 'venv'}\n")
    assert _made(tmp_path) == [f"-m venv {tmp_path / 'venv'}"]


@pytest.mark.parametrize("what", ["folder", "file"])
def test_a_folder_that_is_no_environment_is_never_cleared(tmp_path, what):
    """JANUSFLOW_VENV pointed at another folder by mistake: venv --clear would have emptied it."""
    venv = tmp_path / "venv"
    if what == "folder":
        venv.mkdir()
        (venv / "notes.txt").write_text("mine")
    else:
        venv.write_text("mine")
    done = _bootstrap(tmp_path, venv_made=False)
    assert done.returncode == 2 and done.stdout == "" and not _made(tmp_path)
    assert done.stderr.strip() == (f"[bootstrap] {venv} exists and is not a virtual environment (no pyvenv.cfg); "
                                   "move it away, or set JANUSFLOW_VENV to another folder")
    assert (venv / "notes.txt" if what == "folder" else venv).read_text() == "mine"


def test_a_python_too_old_or_missing_is_one_line(tmp_path):
    done = _bootstrap(tmp_path, venv_made=False, VERSION="3.9.18")
    assert done.returncode == 2 and not _made(tmp_path)
    assert done.stderr.strip() == (f"[bootstrap] {tmp_path / 'maker' / 'python3'} is Python 3.9.18; this project "
                                   "needs 3.10 or newer: set PYTHON=/path/to/python3.10+")
    done = _bootstrap(tmp_path, venv_made=False, PYTHON="no-such-python3")
    assert done.returncode == 2
    assert done.stderr.strip() == ("[bootstrap] no-such-python3: not found; install Python >= 3.10, or set "
                                   "PYTHON=/path/to/python3")


def test_an_environment_without_pip_gets_it_back_and_keeps_its_packages(tmp_path):
    """uv venv, venv --without-pip: clearing it would have thrown away everything installed in it."""
    assert _bootstrap(tmp_path).returncode == 0
    stamp = tmp_path / "venv" / ".janusflow-installed"
    stamp.unlink()  # setup.py changed since: the install runs again
    done = _bootstrap(tmp_path, NO_PIP="1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"[bootstrap] {tmp_path / 'venv'} has no pip: installing it with ensurepip\n")
    assert not _made(tmp_path)  # not made again
    calls = _calls(tmp_path)
    assert "-m ensurepip --upgrade" in calls and calls[-1] == "-m pip install -e .[test]"


def test_the_checks_ignore_a_broken_pythonpath_of_the_caller(tmp_path):
    """A PYTHONHOME that breaks Python's start is the shell's problem, not the environment's."""
    assert _bootstrap(tmp_path).returncode == 0
    done = _bootstrap(tmp_path, PYTHONHOME="/nonexistent")
    assert done.returncode == 0 and done.stdout == "" and not _made(tmp_path)
