"""scripts/bootstrap.sh keeps pip's output off the console and still says what failed.

A stand-in for the environment's python records each pip call: the real installs take minutes and
the network; what is tested here is the script's handling of pip's output and exit status.
"""

import os
import subprocess
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


def _bootstrap(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    python = venv / "bin" / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return subprocess.run(["bash", str(REPO / "scripts" / "bootstrap.sh")], capture_output=True, text=True,
                          env={**os.environ, "JANUSFLOW_VENV": str(venv), **env}, timeout=60)


def test_pip_output_goes_to_the_log_and_the_console_gets_one_line_per_stage(tmp_path):
    done = _bootstrap(tmp_path)
    assert done.returncode == 0, done.stderr
    console = (done.stdout + done.stderr).splitlines()
    assert console and all(line.startswith("[bootstrap] ") for line in console), console
    log = (tmp_path / "venv" / "bootstrap.log").read_text()
    assert "WARNING: Location" in log and "Successfully installed" in log
    calls = (tmp_path / "venv" / "calls").read_text().splitlines()
    assert calls[0] == "-m pip install --upgrade pip" and calls[-1] == "-m pip install -e .[test]"
    assert (tmp_path / "venv" / ".janusflow-installed").exists()
    # Unchanged setup.py: the second run installs nothing.
    again = _bootstrap(tmp_path)
    assert again.returncode == 0 and again.stdout == again.stderr == ""
    assert (tmp_path / "venv" / "calls").read_text().splitlines() == calls


def test_a_failed_install_names_the_log_shows_its_end_and_writes_no_stamp(tmp_path):
    done = _bootstrap(tmp_path, FAIL_ON=".[test]")
    assert done.returncode == 1
    log = tmp_path / "venv" / "bootstrap.log"
    assert f"pip install -e .[test] failed; the end of its output (all of it: {log}):" in done.stderr
    assert "ERROR: No matching distribution found for .[test]" in done.stderr
    assert not (tmp_path / "venv" / ".janusflow-installed").exists()
