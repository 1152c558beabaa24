#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv: the only set-up step.
# On a host without an NVIDIA GPU the CPU wheel of torch is installed first, so nothing pulls CUDA.
# Re-running is cheap: it does nothing when setup.py has not changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${JANUSFLOW_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.janusflow-installed"
want=$(cat setup.py pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
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
echo "[bootstrap] installing janusflow-pretrain and its dependencies (pip's output: $LOG)"
pip_install -e ".[test]"
echo "$want" > "$stamp"
