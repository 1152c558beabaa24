#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv: the only set-up step.
#   bash scripts/bootstrap.sh [run|test]
# run: what training, sampling and the demo need (`make demo`); test (the default): that and the
# test tools with Triton, whose interpreter runs the kernel tests on the CPU (`make test`). The
# demo skips Triton (about 1 GB, 13 s of its first run's set-up): on the CPU nothing runs it, and
# CUDA builds of torch bring it themselves.
# On a host without an NVIDIA GPU the CPU wheel of torch is installed first, so nothing pulls CUDA.
# Re-running is cheap: it does nothing when setup.py has not changed since the last install of
# this set or of the larger one (test includes run).
set -euo pipefail
WANT=${1:-test}
case "$WANT" in
  run) EXTRAS="" ;;
  test) EXTRAS="[test]" ;;
  *) echo "[bootstrap] unknown set '$WANT': use run (training, sampling, the demo) or test (also the tests)" >&2
     exit 2 ;;
esac
cd "$(dirname "$0")/.."
VENV=${JANUSFLOW_VENV:-.venv}
PY=${PYTHON:-python3}

# The checks ignore the caller's PYTHONHOME/PYTHONPATH: a shell setting that breaks Python's start
# is no reason to throw a good environment away (pip would fail with it too, and say so).
quietly() { env -u PYTHONHOME -u PYTHONPATH "$@" >/dev/null 2>&1; }
# Python >= 3.10 (setup.py's python_requires), said here rather than deep in pip's log.
new_enough() { quietly "$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; }
# A usable environment: its Python runs and is new enough, and it has pip. One whose Python was
# removed (a pyenv version uninstalled, a folder copied from another machine) is made again rather
# than failing in pip on every run. One without pip (uv venv, venv --without-pip, a venv half made
# where ensurepip was missing) gets pip from ensurepip first: what is installed in it stays.
usable() {
  [ -x "$VENV/bin/python" ] && new_enough "$VENV/bin/python" || return 1
  quietly "$VENV/bin/python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("pip") is None)' &&
    return 0
  echo "[bootstrap] $VENV has no pip: installing it with ensurepip"
  quietly "$VENV/bin/python" -m ensurepip --upgrade
}
if ! usable; then
  if ! command -v "$PY" >/dev/null 2>&1; then
    echo "[bootstrap] $PY: not found; install Python >= 3.10, or set PYTHON=/path/to/python3" >&2
    exit 2
  fi
  if ! new_enough "$PY"; then
    echo "[bootstrap] $PY is Python $("$PY" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '?');" \
      "this project needs 3.10 or newer: set PYTHON=/path/to/python3.10+" >&2
    exit 2
  fi
  if [ -e "$VENV" ] && [ -n "$(ls -A "$VENV" 2>/dev/null || echo file)" ]; then
    # Only a virtual environment is ever cleared: JANUSFLOW_VENV pointed at another folder by mistake
    # must not lose its files.
    if [ ! -f "$VENV/pyvenv.cfg" ]; then
      echo "[bootstrap] $VENV exists and is not a virtual environment (no pyvenv.cfg); move it away, or set" \
        "JANUSFLOW_VENV to another folder" >&2
      exit 2
    fi
    echo "[bootstrap] $VENV is not usable (its Python is missing or older than 3.10, or pip cannot be put in): making it again"
    "$PY" -m venv --clear "$VENV"
  else
    echo "[bootstrap] creating $VENV"
    "$PY" -m venv "$VENV"
  fi
fi
stamp="$VENV/.janusflow-installed"
want=$(cat setup.py pyproject.toml | sha256sum | cut -d' ' -f1)
# The stamp holds the hash of the files that were installed from and the set installed.
if [ -f "$stamp" ]; then
  read -r had_hash had_set _ < "$stamp" || true
  if [ "${had_hash:-}" = "$want" ] && { [ "${had_set:-test}" = test ] || [ "$WANT" = run ]; }; then
    exit 0
  fi
fi
# pip's own output (its warnings about this host's index settings included) goes to a log, so the
# console keeps one line per stage; a failed install prints the log's end and where the log is.
LOG="$VENV/bootstrap.log"
: > "$LOG"
pip_install() {
  if ! "$VENV/bin/python" -m pip install "$@" >>"$LOG" 2>&1; then
    echo "[bootstrap] pip install $* failed; the end of its output (all of it: $LOG):" >&2
    tail -n 25 "$LOG" >&2
    exit 1
  fi
}
pip_install --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "[bootstrap] no NVIDIA GPU: installing the CPU build torch==2.13.0"
  pip_install "torch==2.13.0"
fi
what="janusflow-pretrain and its dependencies"
[ "$WANT" = test ] && what="$what, with the test tools and Triton"
echo "[bootstrap] installing $what (pip's output: $LOG)"
pip_install -e ".$EXTRAS"
echo "$want $WANT" > "$stamp"
