#!/usr/bin/env bash
# Janus-Pro on a CPU, end to end, on the demo's shapes data set (recipes/januspro_demo_cpu.yaml):
#   1. python -m data_tools synth        the shapes data set (train + held-out split, tokenizer)
#   2. python -m data_tools fit-codec    a k-means codebook over 4x4-pixel patches of the training
#                                        images: the image codec (the real VQ-16 cannot be trained here)
#   3. python -m data_tools build        Janus-Pro shards: generation images as 8x8 codes of that codec
#   4. pretrain/main.py                  DeepSpeed training through the autoregressive image path
#   5. python -m pretrain.januspro_demo sample, with the EMA weights:
#                                        held-out prompts -> codes (CFG on logits) -> codec decode -> PNG;
#                                        held-out colour questions -> answers
#   6. python -m pretrain.evaluate       generation colour accuracy (chance 1/6) and QA accuracy
# Each step is skipped when its output exists and was made from the inputs now there, so a re-run
# resumes; an output made from other inputs (raw data synthesised again, a codec fitted again, a
# training run of another NPROC or longer than STEPS) is refused with a line saying what to remove.
# Each step's full output goes to OUT/logs/<step>.log; a failing step stops the script with one line
# naming it and its log. Settings (environment), all checked before any work:
#   OUT=runs/januspro_demo (a relative OUT is taken from the current folder; without OUT, the
#   repository's runs/januspro_demo)  NPROC=2 (1, 2 or 4: the recipe's global batch splits over them)
#   STEPS=(the recipe's: stop the run at step STEPS of its schedule, 1..optim.steps)  WORKERS=2
#   CFG_WEIGHT=3 (a finite number)  TEMPERATURE=1 (finite, >= 0; 0: the most likely code)
#   PYTHON=.venv/bin/python (the repository's environment)
set -euo pipefail
say() { echo "[januspro demo] $*"; }
refuse() { echo "[januspro demo] error: $*" >&2; exit 2; }
trap 'echo "[januspro demo] interrupted: run the same command again to continue where it stopped" >&2; exit 130' INT TERM

CALLER=$PWD
REPO=$(cd "$(dirname "$0")/.." && pwd)
absolute() { case $1 in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$CALLER" "$1" ;; esac; }

# PYTHON: a path (relative to the current folder) or a command name; quoted everywhere, so it may hold spaces.
if [ -z "${PYTHON:-}" ]; then
  PY=$REPO/.venv/bin/python
  [ -x "$PY" ] || refuse "$PY not found: make the environment (bash scripts/bootstrap.sh) or give PYTHON"
else
  case $PYTHON in
    */*) PY=$(absolute "$PYTHON") ;;
    *) PY=$(command -v -- "$PYTHON" || true) ;;
  esac
  { [ -n "$PY" ] && [ -f "$PY" ] && [ -x "$PY" ]; } \
    || refuse "PYTHON=$PYTHON: not an executable file; give the environment's python (e.g. $REPO/.venv/bin/python)"
fi
if [ -n "${OUT:-}" ]; then
  OUT=$(absolute "$OUT")
else
  OUT=$REPO/runs/januspro_demo
fi
case $OUT in
  *$'\n'*) refuse "OUT holds a line break; give a folder without one" ;;
  *[][*?]*) refuse "OUT=$OUT: holds one of the characters [ * ?, which DeepSpeed's checkpoint loading (and the \
build's input globs) read as a pattern; give a folder without them" ;;
esac
NPROC=${NPROC-2}
STEPS=${STEPS-}
WORKERS=${WORKERS-2}
CFG_WEIGHT=${CFG_WEIGHT-3}
TEMPERATURE=${TEMPERATURE-1}
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# The steps start their own world on this machine: a launcher's variables left in the shell (inside a
# SLURM step, a torchrun worker) would make the sampler wait for ranks that never come.
unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT
export PYTHONUNBUFFERED=1  # the training's progress lines reach the console as they are printed
RAW=$OUT/raw
LOGS=$OUT/logs
RECIPE=recipes/januspro_demo_cpu.yaml

# The checks (pretrain/januspro_demo.py): `settings` (before any work: the settings, OUT, the recipe,
# the data set and the training run OUT already holds), `codec`, `shards` (each before its step: a
# finished output made from other inputs is refused), `stamp` (after the codec is fitted). A refusal
# is one "[januspro demo] error: ..." line and exit 2, which stops the script with it.
check() { "$PY" -m pretrain.januspro_demo "$@"; }

# A step's whole output goes to its log; a failure stops the script with one line naming the step, the
# child's own "error: ..." line when it printed one, and the log.
step_failed() {  # NAME LOG EXIT
  local line
  line=$(grep -m1 -E '^(\[januspro demo\] )?error: ' "$2" 2>/dev/null || true)
  line=${line#\[januspro demo\] }
  line=${line#error: }
  echo "[januspro demo] error: $1 failed (exit $3)${line:+: $line}; whole output: $2" >&2
  exit 1
}
run_step() {  # NAME LOG COMMAND...
  local name=$1 log=$2 code=0
  shift 2
  "$@" >"$log" 2>&1 || code=$?
  [ "$code" -eq 0 ] || step_failed "$name" "$log" "$code"
}
# A path as a --set value: a JSON string is a YAML one, so ': ' or ' #' in OUT stay part of it.
yaml_text() { local s=${1//\\/\\\\}; s=${s//\"/\\\"}; printf '"%s"' "$s"; }

code=0
checked=$(check settings "$OUT" "$RECIPE" "$NPROC" "$STEPS" "$WORKERS" "$CFG_WEIGHT" "$TEMPERATURE") || code=$?
[ "$code" -ne 2 ] || exit 2  # refused: its line is out
case $code:$checked in
  0:checked | "0:trained "*) ;;
  *) refuse "PYTHON=$PY: did not run the script's checks (exit $code; is it this project's Python?); give the \
environment's python" ;;
esac
mkdir -p "$LOGS"

if [ ! -f "$RAW/synth.json" ]; then  # synth writes it last: without it, step 1 stopped part way and is redone
  say "1/6 synthesise the shapes data set (log: $LOGS/synth.log)"
  run_step "step 1 (data_tools synth)" "$LOGS/synth.log" "$PY" -m data_tools synth --out "$RAW" --overwrite
fi
codec=$(check codec "$OUT")
if [ "$codec" = fit ]; then
  say "2/6 fit the k-means patch codec: 64 codes of 4x4 patches at 32 px (log: $LOGS/fit-codec.log)"
  rm -rf "$OUT/codec"  # a fit stopped part way can leave a codebook beside another fit's codec.json
  run_step "step 2 (data_tools fit-codec)" "$LOGS/fit-codec.log" "$PY" -m data_tools fit-codec \
    --images "$RAW/train/gen-*.tar" --out "$OUT/codec" --codebook-size 64 --patch 4 --resolution 32
  check stamp "$OUT"
elif [ "$codec" != done ]; then
  refuse "the codec check printed ${codec:-nothing} (expected fit or done)"
fi
shards=$(check shards "$OUT")
if [ "$shards" = build ]; then  # data_tools build finishes an interrupted build (and refuses one of other inputs)
  say "3/6 build the Janus-Pro shards (log: $LOGS/build.log)"
  # No text fillers: the 88-token generation documents would use up the short texts as fillers and
  # leave no text rows for the recipe's text share.
  run_step "step 3 (data_tools build)" "$LOGS/build.log" "$PY" -m data_tools build --tokenizer "$RAW/tokenizer" \
    --out "$OUT/shards" --family januspro --codec kmeans_patches --codec-path "$OUT/codec" \
    --gen-wds "$RAW/train/gen-*.tar" --und-wds "$RAW/train/und-*.tar" --llava "$RAW/train/qa.json" \
    --text-jsonl "$RAW/train/text.jsonl" --resolution 32 --und-patch 8 --seq-length 256 --image-format png \
    --no-text-fillers --workers "$WORKERS" --quiet
elif [ "$shards" != done ]; then
  refuse "the shards check printed ${shards:-nothing} (expected build or done)"
fi

if [ "$checked" != checked ]; then
  say "4/6 training: already finished at step ${checked#trained } in $OUT/train"
else
  say "4/6 train on $NPROC process(es) (log: $LOGS/train.log)"
  set +e
  "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" pretrain/main.py --recipe "$RECIPE" \
    --set "data.root=$(yaml_text "$OUT/shards")" --set "train.output_dir=$(yaml_text "$OUT/train")" \
    ${STEPS:+--steps "$STEPS"} 2>&1 | tee "$LOGS/train.log" | grep --line-buffered -E '^\[train\] step '
  codes=("${PIPESTATUS[@]}")
  set -e
  [ "${codes[0]}" -eq 0 ] || step_failed "step 4 (training)" "$LOGS/train.log" "${codes[0]}"
fi

say "5/6 sample the held-out prompts and answer the held-out questions with the EMA weights (log: $LOGS/sample.log)"
rm -rf "$OUT/eval"
run_step "step 5 (sampling)" "$LOGS/sample.log" "$PY" -m pretrain.januspro_demo sample "$OUT" "$CFG_WEIGHT" "$TEMPERATURE"
grep -E '^\[januspro demo\] ' "$LOGS/sample.log" || true
say "6/6 score them (log: $LOGS/evaluate.log)"
code=0
"$PY" -m pretrain.evaluate --heldout "$RAW/heldout" --generated "$OUT/eval/generated" \
  --answers "$OUT/eval/answers.jsonl" --json >"$OUT/eval/report.json" 2>"$LOGS/evaluate.log" || code=$?
[ "$code" -eq 0 ] || step_failed "step 6 (pretrain.evaluate)" "$LOGS/evaluate.log" "$code"
cat "$OUT/eval/report.json"
