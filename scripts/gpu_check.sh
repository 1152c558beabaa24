#!/usr/bin/env bash
# The one prepared check of the CUDA path on one GPU (issue #10), at most 9 minutes, no network:
#
#   bash scripts/gpu_check.sh               # on the GPU machine (the working tree + .gpu_wheels/)
#   bash scripts/gpu_check.sh --cpu-smoke   # anywhere: every phase on the CPU at toy size (plumbing only)
#
# Phases, each under its own time limit (seconds, overridable by GPU_CHECK_LIMIT_<PHASE>):
#   setup       45  install .gpu_wheels/ (made by scripts/gpu_wheels.sh) offline into a folder on
#                   PYTHONPATH, next to the machine's own CUDA torch, Triton and transformers
#   tests      110  pytest -m gpu: Triton kernels vs references, attention backends vs the dense
#                   reference, samplers
#   trainer    130  pretrain.main on the tiny recipe under NCCL: fp32 vs the CPU reference losses,
#                   bf16, save + resume (scripts/gpu_check/trainer_check.py)
#   throughput 170  the 1.3B configuration at 4,096 packed tokens, bf16, next to transformers' Llama
#                   (benchmarks/train_throughput.py), then syncs per micro-step (benchmarks/step_overhead.py)
#   kernels     85  fused kernels vs eager and torch.compile on the 1.3B shapes, % of peak bandwidth, and
#                   which kernels are slower than torch.compile (benchmarks/kernels_bench.py; rows not
#                   started within the limit less 25 s are listed, not timed)
# Every phase runs even when an earlier one failed. Without CUDA each phase says "skipped: no CUDA".
# Logs and the summary (summary.txt, summary.json) go to $OUT when set, else runs/gpu_check/; the
# exit status is 1 when a phase failed or timed out, else 0.
#
# GPU_CHECK_ONLY="trainer kernels" runs only the phases named (and setup), e.g. for a second try
# that fits the device time left. Environment: GPU_CHECK_PYTHON (default python3: on the GPU machine the one that holds CUDA torch),
# GPU_WHEELS_DIR (default .gpu_wheels), GPU_CHECK_SITE (where the wheels go, default a temporary folder).
set -uo pipefail
PHASES="setup tests trainer throughput kernels"
usage() {
  cat <<'EOF'
usage: bash scripts/gpu_check.sh [--cpu-smoke] [-h|--help]
  --cpu-smoke   every phase on the CPU at toy size (plumbing only); default: the GPU run
environment (default):
  OUT                          folder for the logs and summary.txt/json (runs/gpu_check/ in the repository)
  GPU_CHECK_ONLY               phases to run besides setup, of: tests trainer throughput kernels (all)
  GPU_CHECK_LIMIT_<PHASE>      seconds per phase, a whole number >= 1 (SETUP 45, TESTS 110, TRAINER 130,
                               THROUGHPUT 170, KERNELS 85)
  GPU_CHECK_PYTHON             the Python that holds CUDA torch (python3)
  GPU_WHEELS_DIR               the wheels of scripts/gpu_wheels.sh (.gpu_wheels in the repository)
  GPU_CHECK_SITE               where the wheels are installed (a temporary folder)
EOF
}
# One error line naming what to change, exit status 2, before any phase runs.
die() { echo "gpu_check.sh: error: $*" >&2; exit 2; }

SMOKE=0
for arg in "$@"; do  # every argument, not only the first (a second one was silently ignored)
  case "$arg" in
    --cpu-smoke) SMOKE=1 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument '$arg'" ;;
  esac
done
# A relative $OUT is the caller's folder, not the repository's (the script changes to the latter).
if [ -n "${OUT:-}" ] && [[ "$OUT" != /* ]]; then
  OUT=$PWD/$OUT
fi
cd "$(dirname "$0")/.." || die "cannot change to the repository folder"
ROOT=$PWD
SELF=$ROOT/scripts/gpu_check.sh
PY=${GPU_CHECK_PYTHON:-python3}
WHEELS=${GPU_WHEELS_DIR:-.gpu_wheels}
LOG_DIR=${OUT:-runs/gpu_check}

LIMIT_SETUP=${GPU_CHECK_LIMIT_SETUP:-45}
LIMIT_TESTS=${GPU_CHECK_LIMIT_TESTS:-110}
LIMIT_TRAINER=${GPU_CHECK_LIMIT_TRAINER:-130}
LIMIT_THROUGHPUT=${GPU_CHECK_LIMIT_THROUGHPUT:-170}
LIMIT_KERNELS=${GPU_CHECK_LIMIT_KERNELS:-85}
OVERHEAD_LIMIT=40  # of the throughput phase, for benchmarks/step_overhead.py
# A limit that is not a whole number of seconds made timeout(1) fail every phase and the summary a
# traceback; refused here instead.
for phase in $PHASES; do
  limit=LIMIT_${phase^^}
  [[ "${!limit}" =~ ^[0-9]+$ ]] && [ "${!limit}" -ge 1 ] \
    || die "GPU_CHECK_LIMIT_${phase^^}=${!limit}: give a whole number of seconds, at least 1"
done
# A misspelt phase in GPU_CHECK_ONLY skipped every phase and passed.
for phase in ${GPU_CHECK_ONLY:-}; do
  [[ " $PHASES " == *" $phase "* ]] || die "GPU_CHECK_ONLY: unknown phase '$phase'; choose from $PHASES"
done

# run_phase NAME LIMIT COMMAND...: the command's output to $LOG_DIR/NAME.log, one line in phases.tsv
run_phase() {
  local name=$1 limit=$2 start rc seconds
  shift 2
  if [ -n "${GPU_CHECK_ONLY:-}" ] && [ "$name" != setup ] && [[ " $GPU_CHECK_ONLY " != *" $name "* ]]; then
    skip_phase "$name" "not selected (GPU_CHECK_ONLY=$GPU_CHECK_ONLY)"
    return
  fi
  echo "== $name (limit ${limit} s)"
  start=$(date +%s%N)
  timeout --kill-after=10 "$limit" "$@" >"$LOG_DIR/$name.log" 2>&1
  rc=$?
  seconds=$(awk -v a="$start" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$seconds" "$limit" >>"$WORK/phases.tsv"
  tail -n 4 "$LOG_DIR/$name.log" | cut -c1-200 | sed 's/^/   /'
}

skip_phase() {  # NAME REASON
  echo "== $1"
  echo "$1: skipped: $2" | tee "$LOG_DIR/$1.log" | sed 's/^/   /'
  printf '%s\tskip\t0\t0\t%s\n' "$1" "$2" >>"$WORK/phases.tsv"
}

setup_phase() {
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "setup: no wheels in $WHEELS: run 'bash scripts/gpu_wheels.sh' on a machine with network and carry $WHEELS"
    return 1
  fi
  echo "setup: installing $(ls "$WHEELS"/*.whl | wc -l) wheels offline into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl || return 1
  PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" - <<'EOF'
import deepspeed, diffusers, megatron.core, torch, triton, transformers  # noqa: F401
import pretrain.main  # noqa: F401
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
print(f"setup: torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, transformers "
      f"{transformers.__version__}, deepspeed {deepspeed.__version__}, megatron-core {megatron.core.__version__}; {dev}")
EOF
}

throughput_phase() {
  local rc=0
  if [ $SMOKE = 1 ]; then
    "$PY" benchmarks/train_throughput.py --toy --json "$WORK/throughput.json" || rc=$?
  else
    timeout --kill-after=5 $((LIMIT_THROUGHPUT > OVERHEAD_LIMIT + 6 ? LIMIT_THROUGHPUT - OVERHEAD_LIMIT - 5 : 1)) \
      "$PY" benchmarks/train_throughput.py --steps 5 --warmup 2 --global-batch 4 --json "$WORK/throughput.json" || rc=$?
  fi
  if [ -f benchmarks/step_overhead.py ] && [ $SMOKE = 0 ]; then
    echo "== benchmarks/step_overhead.py --json --dtype bf16"
    timeout --kill-after=5 $OVERHEAD_LIMIT "$PY" benchmarks/step_overhead.py --json --dtype bf16 \
      >"$WORK/overhead.json" || echo "step_overhead: failed or timed out (syncs per micro-step: n/a)"
    tail -c 2000 "$WORK/overhead.json"
  fi
  return $rc
}
# The setup and throughput phases are functions: the parent runs them under `timeout` through a
# second invocation of this script that does only that.
case "${GPU_CHECK_INTERNAL:-}" in
  setup|throughput) WORK=$GPU_CHECK_WORK SITE=$GPU_CHECK_SITE ;;  # made and checked by the parent
esac
case "${GPU_CHECK_INTERNAL:-}" in
  setup) setup_phase; exit $? ;;
  throughput) throughput_phase; exit $? ;;
esac

# ---------------------------------------------------------------------------------------------
# The output folder, the work folder and the Python are checked before the first phase: an $OUT that
# was a file (or could not be made) ran every phase and ended in the summary's traceback, and a
# missing Python reported every phase as "skipped: no CUDA".
if ! mkdir -p "$LOG_DIR" 2>/dev/null || [ ! -d "$LOG_DIR" ]; then
  die "OUT=$LOG_DIR: cannot create that folder (it or a parent is a file, or no permission); set OUT to a folder you can write to"
fi
probe="$LOG_DIR/.gpu_check_write_test"
{ : >"$probe"; } 2>/dev/null && rm -f "$probe" || die "OUT=$LOG_DIR: the folder is not writable; set OUT to a folder you can write to"
WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX" 2>/dev/null)} \
  || die "cannot create a work folder in ${TMPDIR:-/tmp}: set TMPDIR to a writable folder"
{ mkdir -p "$WORK" && : >"$WORK/phases.tsv"; } 2>/dev/null \
  || die "GPU_CHECK_WORK=$WORK: cannot write there; unset it or give a writable folder"
SITE=${GPU_CHECK_SITE:-$WORK/site}
"$PY" -c 'import sys' 2>/dev/null || die "GPU_CHECK_PYTHON=$PY: cannot run that Python; set GPU_CHECK_PYTHON to one that holds torch"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  CUDA=1
else
  CUDA=0
fi
version=$("$PY" -c 'import platform; print(platform.python_version())' 2>/dev/null)
echo "gpu_check: python $version, CUDA $([ $CUDA = 1 ] && echo yes || echo no), smoke $SMOKE; logs in $LOG_DIR," \
  "work in $WORK"

export GPU_CHECK_WORK=$WORK GPU_CHECK_SITE=$SITE
if [ $SMOKE = 1 ]; then
  skip_phase setup "smoke run: the CPU environment is used as it is"
  run_phase tests "$LIMIT_TESTS" "$PY" -m pytest -m gpu -q -p no:cacheprovider --timeout=60 \
    --continue-on-collection-errors --junitxml="$WORK/junit.xml" tests
  run_phase trainer "$LIMIT_TRAINER" "$PY" scripts/gpu_check/trainer_check.py --allow-cpu --work "$WORK/trainer" \
    --json "$WORK/trainer.json" --budget $((LIMIT_TRAINER > 11 ? LIMIT_TRAINER - 10 : 1))
  run_phase throughput "$LIMIT_THROUGHPUT" env GPU_CHECK_INTERNAL=throughput bash "$SELF" --cpu-smoke
  run_phase kernels "$LIMIT_KERNELS" "$PY" benchmarks/kernels_bench.py --only rf_loss,repa_cosine --no-compile \
    --json "$WORK/kernels.json"
elif [ $CUDA = 0 ]; then
  echo "$PY sees no GPU: every phase is skipped (--cpu-smoke runs them on the CPU at toy size)"
  for phase in setup tests trainer throughput kernels; do
    skip_phase $phase "no CUDA"
  done
else
  run_phase setup "$LIMIT_SETUP" env GPU_CHECK_INTERNAL=setup bash "$SELF"
  export PYTHONPATH="$SITE:$PYTHONPATH"
  run_phase tests "$LIMIT_TESTS" "$PY" -m pytest -m gpu -q -p no:cacheprovider --timeout=60 \
    --continue-on-collection-errors --junitxml="$WORK/junit.xml" tests
  run_phase trainer "$LIMIT_TRAINER" "$PY" scripts/gpu_check/trainer_check.py --work "$WORK/trainer" \
    --json "$WORK/trainer.json" --budget $((LIMIT_TRAINER > 11 ? LIMIT_TRAINER - 10 : 1))
  run_phase throughput "$LIMIT_THROUGHPUT" env GPU_CHECK_INTERNAL=throughput bash "$SELF"
  run_phase kernels "$LIMIT_KERNELS" "$PY" benchmarks/kernels_bench.py --warmup 10 --rep 40 \
    --budget $((LIMIT_KERNELS > 25 ? LIMIT_KERNELS - 25 : 0)) --json "$WORK/kernels.json"
fi

"$PY" scripts/gpu_check/summary.py --work "$WORK" --out "$LOG_DIR"
status=$?
rm -rf "$WORK/site" "$WORK/trainer"  # installed wheels and checkpoints; the logs are in $LOG_DIR
exit $status
