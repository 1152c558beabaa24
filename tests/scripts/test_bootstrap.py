"""scripts/bootstrap.sh keeps pip's output off the console and still says what failed.

A stand-in for the environment's python records each pip call: the real installs take minutes and
the network; what is tested here is the script's handling of pip's output and exit status.
"""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for .venv/bin/python: `-m pip install ...` prints like pip on a host with a stale index
# setting, and fails when FAIL_ON is one of its arguments.
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


def _bootstrap(tmp_path: Path, *args: str, **env) -> subprocess.CompletedProcess:
    """bootstrap.sh with ``args`` (its set: run or test) and ``env`` added to the environment."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    python = venv / "bin" / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
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
from kernels import dispatch
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
