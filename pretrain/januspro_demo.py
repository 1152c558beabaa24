"""The Python of scripts/januspro_cpu_demo.sh (Janus-Pro on a CPU, end to end): its checks and its
sampling step. The script stays the orchestrator (steps, logs, one failure line per step) and calls

  python -m pretrain.januspro_demo settings OUT RECIPE NPROC STEPS WORKERS CFG_WEIGHT TEMPERATURE
      before any work: the settings, OUT, the recipe, the data set and the training run OUT holds;
      prints "checked", or "trained N" for a finished run (step 4 is skipped)
  python -m pretrain.januspro_demo codec OUT     before step 2: prints "fit" (no finished codec) or "done"
  python -m pretrain.januspro_demo stamp OUT     after step 2: OUT/codec/fitted_on.json, the files it was fitted on
  python -m pretrain.januspro_demo shards OUT    before step 3: prints "build" (none finished) or "done"
  python -m pretrain.januspro_demo sample OUT CFG_WEIGHT TEMPERATURE
      step 5: an image for each held-out prompt, an answer to each held-out question (EMA weights)

A check that refuses prints one "[januspro demo] error: ..." line and exits 2: an output made from
other inputs (the data set synthesised again, the codec fitted again, a run of another NPROC or
longer than STEPS) names what to remove. The checks shared with the JanusFlow demo (pretrain.demo)
are in pretrain.demo_outputs; this module imports only the standard library at its top, so a
Python without the project's packages is told so in one line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from pathlib import Path

from pretrain.demo_outputs import (StaleOutput, changed_inputs, check_out, check_resume, data_set_damage, differences,
                                   fitting_nproc, input_fingerprints, latest_run, listed)

PREFIX = "[januspro demo]"


class BadSetting(Exception):
    """A setting of the script (NPROC, STEPS, ...) that cannot be used: one line saying which and why."""


def whole(name: str, text: str, low: int = 1) -> int:
    try:
        value = int(text)
    except ValueError:
        raise BadSetting(f"{name}={text}: not a whole number; give one of at least {low}") from None
    if value < low:
        raise BadSetting(f"{name}={text}: must be at least {low}")
    return value


def finite(name: str, text: str, low: float | None = None) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadSetting(f"{name}={text}: not a number") from None
    if not math.isfinite(value):
        raise BadSetting(f"{name}={text}: must be a finite number")
    if low is not None and value < low:
        raise BadSetting(f"{name}={text}: must be at least {low:g}")
    return value


# ------------------------------------------------------------------------------------------ checks


def check_settings(out: Path, recipe_path: str, nproc: str, steps: str, workers: str, cfg_weight: str,
                   temperature: str) -> int | None:
    """Everything the script can check before any work; the settings as the environment gave them
    (STEPS "" for the recipe's). Returns the step of a run already trained to the steps asked for
    (None: the training is to run). Raises ``BadSetting`` or ``StaleOutput``. Makes OUT."""
    from pretrain.model.config import ConfigError
    from pretrain.recipe import load_recipe
    import pretrain.train.checkpoint  # noqa: F401  torch: a PYTHON without it stops here, before OUT is made

    nproc = whole("NPROC", nproc)
    steps = whole("STEPS", steps) if steps != "" else None
    whole("WORKERS", workers)
    finite("CFG_WEIGHT", cfg_weight)
    finite("TEMPERATURE", temperature, 0.0)
    try:
        recipe = load_recipe(recipe_path)
    except ConfigError as err:
        raise BadSetting(f"{recipe_path}: {err}") from None
    fits = fitting_nproc(recipe)
    if nproc not in fits:
        raise BadSetting(f"NPROC={nproc}: the recipe's batch (parallel.global_batch_size "
                         f"{recipe.parallel.global_batch_size}, micro_batch_size {recipe.parallel.micro_batch_size}) "
                         f"trains on {' or '.join(map(str, fits)) or 'no number of'} processes")
    total = recipe.optim.steps
    if steps is not None and steps > total:
        raise BadSetting(f"STEPS={steps}: past the recipe's optim.steps={total}, where its schedule ends; "
                         f"give at most {total}")
    unusable = check_out(out, f"OUT={out}")
    if unusable:
        raise BadSetting(unusable)
    check_finished_outputs(out)
    wanted = steps or total
    trained = check_resume(out, nproc, wanted, nproc_option="NPROC={nproc}",
                           steps_option=f"STEPS={{step}} (or more, up to {total})")
    return trained if trained == wanted else None


def check_finished_outputs(out: Path) -> None:
    """The data set OUT holds is readable, and nothing in OUT was made from a data set that is gone:
    ``StaleOutput`` otherwise. A damaged checkpoint is found here too (before anything is replaced)."""
    raw = out / "raw"
    afresh = f"remove it (rm -rf {shlex.quote(str(out))}) and run the script again"
    made = raw / "synth.json"  # synth writes it last: without it the data set is made again
    if made.exists():
        try:
            json.loads(made.read_text())
        except (OSError, ValueError) as err:
            raise StaleOutput(f"{raw} is damaged ({str(err).partition('; ')[0]}): {afresh}") from None
        damage = data_set_damage(raw)
        if damage:
            raise StaleOutput(f"{raw} is damaged ({damage}): {afresh}")
    run = latest_run(out)
    if made.exists():
        return
    # The data set is made again: whatever OUT holds that was made from an earlier one (codec, shards,
    # a training run) no longer fits it. Said now, before the data set is replaced.
    earlier = [p.parent for p in (out / "codec" / "fitted_on.json", out / "shards" / "manifest.json") if p.exists()]
    earlier += [out / "train"] if run is not None else []
    if earlier:
        one = len(earlier) == 1
        raise StaleOutput(f"{raw} holds no finished data set (synth.json is missing), but "
                          f"{', '.join(map(str, earlier))} {'was' if one else 'were'} made from an earlier one: "
                          f"remove {'it' if one else 'them'} (rm -rf {' '.join(shlex.quote(str(p)) for p in earlier)}) "
                          f"to make everything from a new data set, or {afresh}")


def codec_state(out: Path) -> str:
    """"fit" (no finished codec: fitted afresh) or "done"; ``StaleOutput`` for a damaged codec or one
    fitted on other training images than those in OUT/raw/train."""
    codec, stamp = out / "codec", out / "codec" / "fitted_on.json"
    if not stamp.exists():  # fit-codec stopped part way (or an older script's codec): fitted again
        return "fit"
    try:
        was = json.loads(stamp.read_text())["files"]
        from image_codecs.kmeans import load_kmeans_codec

        load_kmeans_codec(str(codec))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise StaleOutput(f"{codec} is damaged ({str(err).partition('; ')[0]}): remove it (rm -rf "
                          f"{shlex.quote(str(codec))}) to fit it again") from None
    images = _generation_images(out)
    changed = differences(was, images)
    if changed:
        raise StaleOutput(f"{codec} was fitted on other files than those now in {out / 'raw' / 'train'} "
                          f"({listed(changed)}): remove it and what was made with it (rm -rf "
                          f"{shlex.quote(str(codec))} {shlex.quote(str(out / 'shards'))} "
                          f"{shlex.quote(str(out / 'train'))}) to make them from this data set")
    return "done"


def stamp(out: Path) -> None:
    """Records the training images the codec in OUT/codec was just fitted on; written last (through a
    temporary file), so a codec without it is one whose fit stopped part way."""
    path = out / "codec" / "fitted_on.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"files": {k: list(v) for k, v in _generation_images(out).items()}}, indent=1))
    os.replace(tmp, path)


def _generation_images(out: Path) -> dict[str, tuple[int, int]]:
    """Fingerprints of the generation tars: the files the codec is fitted on."""
    return {k: v for k, v in input_fingerprints(out / "raw" / "train").items() if k.startswith("gen-")}


def shards_state(out: Path) -> str:
    """"build" (no finished shards: data_tools build makes or finishes them) or "done"; ``StaleOutput``
    for shards packed from other training files or encoded with another codec than OUT/codec's."""
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
        changed = changed_inputs(built, out / "raw" / "train")
        codec_used = [e.get("fingerprint") for e in built if e.get("format") == "codec"]
        described = manifest["layout"]["image_codec"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise StaleOutput(f"{shards}/manifest.json cannot be read ({type(err).__name__}: {err}): {remove}") from None
    if changed:
        raise StaleOutput(f"{shards} was packed from other files than those now in {out / 'raw' / 'train'} "
                          f"({listed(changed)}): {remove}")
    codec = load_kmeans_codec(str(out / "codec")).describe()
    if codec != described or codec_used != [codec["fingerprint"]]:
        raise StaleOutput(f"{shards} was encoded with another codec than the one now in {out / 'codec'} (fitted "
                          f"again since: its images would be decoded with the wrong codebook): {remove}")
    return "done"


# ---------------------------------------------------------------------------------------- sampling

GEN_BATCH = 20  # prompts sampled together (one CFG batch of 2 x 20 rows)


def sample(out: Path, cfg_weight: float, temperature: float) -> None:
    """Step 5: with the EMA weights of OUT/train, an image for each held-out prompt (codes sampled
    with CFG on the logits, decoded by OUT/codec) in OUT/eval/generated/<index>.png, and an answer to
    each held-out question in OUT/eval/answers.jsonl."""
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
    # The script shows this line of the step's log on the console.
    print(f"{PREFIX} {tag}: {len(spec['generation'])} images (CFG {cfg_weight}, temperature {temperature}), "
          f"{len(spec['qa'])} questions", flush=True)
    generated = out / "eval" / "generated"
    items = spec["generation"]
    for start in range(0, len(items), GEN_BATCH):
        batch = items[start:start + GEN_BATCH]
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


# ------------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain.januspro_demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    settings = commands.add_parser("settings", help="before any work: the settings, OUT and what it holds")
    # As the environment gave them (checked here, with the script's names in the messages).
    for name in ("out", "recipe", "nproc", "steps", "workers", "cfg_weight", "temperature"):
        settings.add_argument(name)
    for name, says in (("codec", "before step 2: fit or done"), ("stamp", "after step 2: record the codec's inputs"),
                       ("shards", "before step 3: build or done")):
        commands.add_parser(name, help=says).add_argument("out")
    sampling = commands.add_parser("sample", help="step 5: images and answers from the EMA weights")
    sampling.add_argument("out")
    sampling.add_argument("cfg_weight", type=float)
    sampling.add_argument("temperature", type=float)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if args.command == "sample":
        sample(out, args.cfg_weight, args.temperature)
        return 0
    try:
        try:
            if args.command == "settings":
                trained = check_settings(out, args.recipe, args.nproc, args.steps, args.workers, args.cfg_weight,
                                         args.temperature)
                print("checked" if trained is None else f"trained {trained}")
            elif args.command == "codec":
                print(codec_state(out))
            elif args.command == "stamp":
                stamp(out)
            elif args.command == "shards":
                print(shards_state(out))
        except ImportError as err:
            raise BadSetting(f"PYTHON={sys.executable}: cannot import this project's packages ({type(err).__name__}: "
                             f"{err}); give the environment's python (.venv/bin/python, made by scripts/bootstrap.sh)"
                             ) from None
    except (BadSetting, StaleOutput) as err:
        print(f"{PREFIX} error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
