#!/usr/bin/env bash
# Janus-Pro on a CPU, end to end, on the demo's shapes data set (recipes/januspro_demo_cpu.yaml):
#   1. python -m data_tools synth        the shapes data set (train + held-out split, tokenizer)
#   2. python -m data_tools fit-codec    a k-means codebook over 4x4-pixel patches of the training
#                                        images: the image codec (the real VQ-16 cannot be trained here)
#   3. python -m data_tools build        Janus-Pro shards: generation images as 8x8 codes of that codec
#   4. pretrain/main.py                  DeepSpeed training through the autoregressive image path
#   5. sampling with the EMA weights     held-out prompts -> codes (CFG on logits) -> codec decode -> PNG;
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
export PYTHONUNBUFFERED=1  # the training's progress lines reach the console as they are printed
RAW=$OUT/raw
LOGS=$OUT/logs
RECIPE=recipes/januspro_demo_cpu.yaml
STAMP=$OUT/codec/fitted_on.json  # written last by step 2: the training files the codec was fitted on

# One Python helper for the checks: `check settings` (before any work: the settings, OUT, the
# recipe, the data set and the training run OUT already holds), `check codec`, `check shards`
# (each before its step: a finished output made from other inputs is refused), `stamp` (after the
# codec is fitted). A refusal is one "[januspro demo] error: ..." line and exit 2.
check() {
  "$PY" - "$@" <<'EOF'
import json
import math
import os
import shlex
import sys
from pathlib import Path


class Refusal(Exception):
    pass


def whole(name, text, low=1):
    try:
        value = int(text)
    except ValueError:
        raise Refusal(f"{name}={text}: not a whole number; give one of at least {low}") from None
    if value < low:
        raise Refusal(f"{name}={text}: must be at least {low}")
    return value


def finite(name, text, low=None):
    try:
        value = float(text)
    except ValueError:
        raise Refusal(f"{name}={text}: not a number") from None
    if not math.isfinite(value):
        raise Refusal(f"{name}={text}: must be a finite number")
    if low is not None and value < low:
        raise Refusal(f"{name}={text}: must be at least {low:g}")
    return value


def fingerprints(train):
    """{name: (size, mtime_ns)} of the training files that the codec and the shards are made from."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns)
            for pattern in ("gen-*.tar", "und-*.tar", "qa.json", "text.jsonl") for p in sorted(train.glob(pattern))}


def differences(was, now):
    changed = [f"{n} is gone" for n in was if n not in now] + [f"{n} is new" for n in now if n not in was]
    changed += [f"{n} changed" for n in now if n in was and tuple(was[n]) != tuple(now[n])]
    return f"{'; '.join(changed[:3])}{'; ...' if len(changed) > 3 else ''}"


def settings(out, recipe_path, nproc, steps, workers, cfg_weight, temperature):
    from pretrain.model.config import ConfigError
    from pretrain.recipe import load_recipe
    from pretrain.train.checkpoint import latest_tag, read_trainer_state  # torch: a PYTHON without it stops here
    from pretrain.train.safe_load import CheckpointError

    nproc = whole("NPROC", nproc)
    steps = whole("STEPS", steps) if steps != "" else None
    whole("WORKERS", workers)
    finite("CFG_WEIGHT", cfg_weight)
    finite("TEMPERATURE", temperature, 0.0)
    try:
        recipe = load_recipe(recipe_path)
    except ConfigError as err:
        raise Refusal(f"{recipe_path}: {err}") from None
    fits = []
    for n in range(1, recipe.parallel.global_batch_size + 1):
        try:
            recipe.validate_world(n)
            fits.append(n)
        except ConfigError:
            pass
    if nproc not in fits:
        raise Refusal(f"NPROC={nproc}: the recipe's batch (parallel.global_batch_size {recipe.parallel.global_batch_size}, "
                      f"micro_batch_size {recipe.parallel.micro_batch_size}) trains on "
                      f"{' or '.join(map(str, fits)) or 'no number of'} processes")
    total = recipe.optim.steps
    if steps is not None and steps > total:
        raise Refusal(f"STEPS={steps}: past the recipe's optim.steps={total}, where its schedule ends; give at most {total}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise Refusal(f"OUT={out}: is a file, not a folder; give a folder (it is made if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".januspro_write_probe"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise Refusal(f"OUT={out}: cannot write there ({err.strerror or err}); give a writable folder") from None
    afresh = f"remove it (rm -rf {shlex.quote(str(out))}) and run the script again"
    raw = out / "raw"
    if (raw / "synth.json").exists():  # synth writes it last: without it the data set is made again
        from pretrain.evaluate import load_eval
        from datacontract.tokenizer import load_tokenizer

        try:
            json.loads((raw / "synth.json").read_text())
            load_eval(str(raw / "heldout"))
            load_tokenizer(str(raw / "tokenizer"))
        except (OSError, ValueError) as err:
            raise Refusal(f"{raw} is damaged ({str(err).partition('; ')[0]}): {afresh}") from None
    ckpt = out / "train" / "checkpoints"
    try:
        tag = latest_tag(ckpt)
        state = None if tag is None else read_trainer_state(ckpt / tag / "trainer_rank0.json")
    except CheckpointError as err:
        raise Refusal(str(err)) from None
    if not (raw / "synth.json").exists():
        # The data set is made again below: whatever OUT holds that was made from an earlier one
        # (codec, shards, a training run) no longer fits it. Said now, before the data set is replaced.
        made = [p.parent for p in (out / "codec" / "fitted_on.json", out / "shards" / "manifest.json") if p.exists()]
        made += [ckpt.parent] if state is not None else []
        if made:
            stale = " ".join(shlex.quote(str(p)) for p in made)
            raise Refusal(f"{raw} holds no finished data set (synth.json is missing), but {', '.join(map(str, made))} "
                          f"{'was' if len(made) == 1 else 'were'} made from an earlier one: remove {'it' if len(made) == 1 else 'them'} "
                          f"(rm -rf {stale}) to make everything from a new data set, or {afresh}")
    if state is None:
        print("checked")
        return
    anew = f"or remove it (rm -rf {shlex.quote(str(out / 'train'))}) to train afresh"
    had = state.get("dp_size", 1)
    if had != nproc and not tag.endswith("_universal"):
        raise Refusal(f"{ckpt / tag} was trained on {had} process{'es' if had > 1 else ''}: give NPROC={had} to "
                      f"continue it, {anew} on {nproc}")
    want = steps or total
    if state["step"] > want:
        raise Refusal(f"{ckpt / tag} is a run trained to step {state['step']}, past the {want} steps asked for: give "
                      f"STEPS={state['step']} (or more, up to {total}) to continue it, {anew}")
    print(f"trained {state['step']}" if state["step"] == want else "checked")


def codec_state(out):
    """'fit' (no finished codec: fitted afresh) or 'done'; a Refusal for a codec of other training files."""
    codec, stamp = out / "codec", out / "codec" / "fitted_on.json"
    if not stamp.exists():  # fit-codec stopped part way (or an older script's codec): fitted again
        return "fit"
    try:
        was = json.loads(stamp.read_text())["files"]
        from image_codecs.kmeans import load_kmeans_codec

        load_kmeans_codec(str(codec))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise Refusal(f"{codec} is damaged ({str(err).partition('; ')[0]}): remove it (rm -rf "
                      f"{shlex.quote(str(codec))}) to fit it again") from None
    now = fingerprints(out / "raw" / "train")
    if {k: tuple(v) for k, v in was.items()} != {k: v for k, v in now.items() if k.startswith("gen-")}:
        gen = {k: v for k, v in now.items() if k.startswith("gen-")}
        raise Refusal(f"{codec} was fitted on other files than those now in {out / 'raw' / 'train'} "
                      f"({differences(was, gen)}): remove it and what was made with it (rm -rf "
                      f"{shlex.quote(str(codec))} {shlex.quote(str(out / 'shards'))} {shlex.quote(str(out / 'train'))}) "
                      "to make them from this data set")
    return "done"


def stamp(out):
    now = fingerprints(out / "raw" / "train")
    path = out / "codec" / "fitted_on.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"files": {k: list(v) for k, v in now.items() if k.startswith("gen-")}}, indent=1))
    os.replace(tmp, path)


def shards_state(out):
    """'build' (no finished shards: data_tools build makes or finishes them) or 'done'; a Refusal for
    shards packed from other training files or encoded with another codec than the one in OUT/codec."""
    shards = out / "shards"
    if not (shards / "manifest.json").exists():
        return "build"
    from datacontract.shards import read_manifest
    from image_codecs.kmeans import load_kmeans_codec

    remove = (f"remove them and the training run made from them (rm -rf {shlex.quote(str(shards))} "
              f"{shlex.quote(str(out / 'train'))}) to build them again")
    try:
        manifest = read_manifest(str(shards))
        built = manifest["input_fingerprints"]
        packed = {Path(e["path"]).name: (e["size"], e["mtime_ns"]) for e in built if e.get("format") != "codec"}
        codec_used = [e.get("fingerprint") for e in built if e.get("format") == "codec"]
        described = manifest["layout"]["image_codec"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise Refusal(f"{shards}/manifest.json cannot be read ({type(err).__name__}: {err}): {remove}") from None
    now = fingerprints(out / "raw" / "train")
    if packed != now:
        raise Refusal(f"{shards} was packed from other files than those now in {out / 'raw' / 'train'} "
                      f"({differences(packed, now)}): {remove}")
    codec = load_kmeans_codec(str(out / "codec")).describe()
    if codec != described or codec_used != [codec["fingerprint"]]:
        raise Refusal(f"{shards} was encoded with another codec than the one now in {out / 'codec'} (fitted again "
                      f"since: its images would be decoded with the wrong codebook): {remove}")
    return "done"


try:
    try:
        kind, out, *rest = sys.argv[1:]
        out = Path(out)
        if kind == "settings":
            settings(out, *rest)
        elif kind == "codec":
            print(codec_state(out))
        elif kind == "stamp":
            stamp(out)
        elif kind == "shards":
            print(shards_state(out))
    except ImportError as err:
        raise Refusal(f"PYTHON={sys.executable}: cannot import this project's packages ({type(err).__name__}: "
                      f"{err}); give the environment's python (.venv/bin/python, made by scripts/bootstrap.sh)") from None
except Refusal as err:
    print(f"[januspro demo] error: {err}", file=sys.stderr)
    sys.exit(2)
EOF
}

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

checked=$(check settings "$OUT" "$RECIPE" "$NPROC" "$STEPS" "$WORKERS" "$CFG_WEIGHT" "$TEMPERATURE")
case $checked in
  checked | "trained "*) ;;
  *) refuse "PYTHON=$PY: did not run the script's checks (is it this project's Python?); give the environment's python" ;;
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
run_step "step 5 (sampling)" "$LOGS/sample.log" "$PY" - "$OUT" "$CFG_WEIGHT" "$TEMPERATURE" <<'EOF'
import json
import sys
from pathlib import Path

import torch

from datacontract.shards import read_manifest
from datacontract.tokenizer import load_tokenizer, resolve_token_spec
from image_codecs import load_image_codec
from pretrain.export import run_weights
from pretrain.runtime.distributed import init_runtime, shutdown_runtime
from pretrain.sample.januspro import (codes_to_uint8, generation_prompt, sample_codes, save_uint8_png,
                                      understanding_prompt)
from pretrain.sample.loading import build_inference_model
from pretrain.sample.understanding import generate_answer, load_understanding_image

out, cfg_weight, temperature = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
heldout = out / "raw" / "heldout"
spec = json.loads((heldout / "eval.json").read_text())
init_runtime()
state, cfg, tag = run_weights(out / "train", weights="ema")
model = build_inference_model(cfg, state)
tokenizer = load_tokenizer(str(out / "raw" / "tokenizer"))
tokens = resolve_token_spec(tokenizer)
layout = read_manifest(str(out / "shards"))["layout"]
codec = load_image_codec(layout["image_codec"]["kind"], str(out / "codec"))
assert codec.describe() == layout["image_codec"], "the codec changed since the shards were built"
side = layout["resolution"] // codec.downsample
print(f"[januspro demo] {tag}: {len(spec['generation'])} images (CFG {cfg_weight}, temperature {temperature}), "
      f"{len(spec['qa'])} questions", flush=True)
generated = out / "eval" / "generated"
items = spec["generation"]
for start in range(0, len(items), 20):
    batch = items[start:start + 20]
    prompts = [generation_prompt(tokenizer, it["prompt"], tokens.bos_id, tokens.begin_of_image_id) for it in batch]
    generators = [torch.Generator().manual_seed(it["index"]) for it in batch]  # one per image: batch-free
    codes = sample_codes(model, prompts, side * side, cfg_weight=cfg_weight, temperature=temperature,
                         pad_id=tokens.pad_id, generator=generators)
    save_uint8_png(codes_to_uint8(codec, codes, (side, side)), [generated / f"{it['index']}.png" for it in batch])
with (out / "eval" / "answers.jsonl").open("w") as f:
    for item in spec["qa"]:
        pixels = load_understanding_image(str(heldout / item["image"]), cfg.und_encoder.image_size)
        ids, kinds = understanding_prompt(tokenizer, tokens, item["question"], cfg.und_encoder.num_image_tokens)
        answer = generate_answer(model, ids, kinds, pixels, tokens.eos_id, max_new_tokens=4)
        f.write(json.dumps({"index": item["index"], "answer": tokenizer.decode(answer).strip()}) + "\n")
shutdown_runtime()
EOF
grep -E '^\[januspro demo\] ' "$LOGS/sample.log" || true
say "6/6 score them (log: $LOGS/evaluate.log)"
code=0
"$PY" -m pretrain.evaluate --heldout "$RAW/heldout" --generated "$OUT/eval/generated" \
  --answers "$OUT/eval/answers.jsonl" --json >"$OUT/eval/report.json" 2>"$LOGS/evaluate.log" || code=$?
[ "$code" -eq 0 ] || step_failed "step 6 (pretrain.evaluate)" "$LOGS/evaluate.log" "$code"
cat "$OUT/eval/report.json"
