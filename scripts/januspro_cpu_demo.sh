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
# Each step is skipped when its output exists, so a re-run resumes. Settings (environment):
#   OUT=runs/januspro_demo  NPROC=2  STEPS=(the recipe's)  WORKERS=2  CFG_WEIGHT=3  TEMPERATURE=1
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/januspro_demo}
NPROC=${NPROC:-2}
WORKERS=${WORKERS:-2}
CFG_WEIGHT=${CFG_WEIGHT:-3}
TEMPERATURE=${TEMPERATURE:-1}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RAW=$OUT/raw
say() { echo "[januspro demo] $*"; }

if [ ! -f "$RAW/heldout/eval.json" ]; then
  say "synthesise the shapes data set"
  $PY -m data_tools synth --out "$RAW" --overwrite
fi
if [ ! -f "$OUT/codec/codec.json" ]; then
  say "fit the k-means patch codec (64 codes of 4x4 patches at 32 px)"
  $PY -m data_tools fit-codec --images "$RAW/train/gen-*.tar" --out "$OUT/codec" --codebook-size 64 --patch 4 \
    --resolution 32
fi
if [ ! -f "$OUT/shards/manifest.json" ]; then
  say "build the Janus-Pro shards"
  # No text fillers: the 88-token generation documents would use up the short texts as fillers and
  # leave no text rows for the recipe's text share.
  $PY -m data_tools build --tokenizer "$RAW/tokenizer" --out "$OUT/shards" --family januspro \
    --codec kmeans_patches --codec-path "$OUT/codec" --gen-wds "$RAW/train/gen-*.tar" \
    --und-wds "$RAW/train/und-*.tar" --llava "$RAW/train/qa.json" --text-jsonl "$RAW/train/text.jsonl" \
    --resolution 32 --und-patch 8 --seq-length 256 --image-format png --no-text-fillers \
    --workers "$WORKERS" --quiet
fi
say "train on $NPROC process(es)"
$PY -m torch.distributed.run --standalone --nproc_per_node="$NPROC" pretrain/main.py \
  --recipe recipes/januspro_demo_cpu.yaml --set "data.root=$OUT/shards" --set "train.output_dir=$OUT/train" \
  ${STEPS:+--steps "$STEPS"}

say "sample the held-out prompts and answer the held-out questions (EMA weights)"
rm -rf "$OUT/eval"
$PY - "$OUT" "$CFG_WEIGHT" "$TEMPERATURE" <<'EOF'
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
say "score them"
$PY -m pretrain.evaluate --heldout "$RAW/heldout" --generated "$OUT/eval/generated" --answers "$OUT/eval/answers.jsonl" \
  --json | tee "$OUT/eval/report.json"
