"""Export a training run's weights (EMA or raw) to the released layout of its family or to our own.

  python -m pretrain.export --run runs/stage2 --weights ema --out exports/stage2-ema
  python -m pretrain.export --run runs/stage2 --tag step_00010000 --weights raw --format ours --out w.safetensors
  python -m pretrain.export --run runs/januspro_7b_stage3 --vq weights/vq16.safetensors --out exports/jp7b

The family comes from the run's recipe (``model.family``). A Janus-Pro release also holds the frozen
VQ-16 tokenizer, which no training checkpoint carries: ``--vq`` (default: the recipe's ``init.vq``)
names its weights (``vq16.safetensors`` written by ``import-release``, or a released folder).

Reads ``RUN/recipe.yaml`` (the model config), the checkpoint's model states of every tensor- and
pipeline-parallel rank (DeepSpeed's files, loaded weights-only and checked against the checkpoint's
``MANIFEST.json``) and, for ``ema``, our
``ema_mp{tp}_{pp}.safetensors`` (the averages of the trained tensors; frozen ones are their weights):
``pretrain.train.offline_weights.checkpoint_weights``. Every tensor and shape is checked against the
recipe (a recipe edited since training is refused, not exported in part), and the output path
before anything is read. Only the weight files of a checkpoint need to be intact: lost optimizer
or trainer files do not send the export to an older checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .convert import check_shapes, januspro
from .convert.release import ours_to_release, release_config_json
from .convert.state import creatable_folder, full_state_shapes, save_state
from .recipe import load_recipe
from .train.checkpoint import CheckpointError, latest_tag
from .train.offline_weights import checkpoint_weights


def run_weights(run: Path, tag: str | None = None, weights: str = "ema") -> tuple[dict, object, str]:
    """-> (our full state, ModelConfig, tag) of a run's checkpoint, whatever its parallel layout."""
    cfg = load_recipe(run / "recipe.yaml").model
    ckpt = run / "checkpoints"
    tag = tag or latest_tag(ckpt, weights_only=True)
    if tag is None or not (ckpt / tag / "COMPLETE").exists():
        raise FileNotFoundError(f"{ckpt}: no complete checkpoint {tag or ''}".strip())
    full = checkpoint_weights(ckpt, tag, cfg, weights)
    # Our own format writes the tensors as they are: a recipe.yaml edited since training must not
    # slip through into a file that no model of that recipe can load.
    check_shapes(full_state_shapes(cfg), full, f"{ckpt / tag} read with {run / 'recipe.yaml'}")
    return full, cfg, tag


def check_output(out: Path, fmt: str) -> None:
    """Refuse an output path that cannot be written, before the weights are read."""
    folder = out if fmt == "release" else out.parent
    if fmt == "ours" and out.is_dir():
        raise ValueError(f"--out {out}: a folder; --format ours writes one file (e.g. {out / 'model.safetensors'})")
    if fmt == "release" and out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: an existing file; the release format writes a folder")
    creatable_folder(folder, out)


def release_config(cfg, out: Path) -> dict:
    """config.json for the export. A SigLIP of non-standard size gets a made-up model name and its
    table entry in ``siglip_entry.json`` beside it (``import-release --siglip`` reads that file)."""
    config_json = januspro.release_config_json if cfg.family == "januspro" else release_config_json
    try:
        return config_json(cfg)
    except ValueError:
        u = cfg.und_encoder
        name = f"siglip_custom_patch{u.patch_size}_{u.image_size}_w{u.hidden_size}_l{u.num_layers}"
        entry = {"image_size": u.image_size, "patch_size": u.patch_size, "width": u.hidden_size,
                 "layers": u.num_layers, "heads": u.num_attention_heads,
                 "mlp_ratio": u.intermediate_size / u.hidden_size}
        (out / "siglip_entry.json").write_text(json.dumps({name: entry}, indent=2))
        return config_json(cfg, siglip_model_name=name)


def release_state(full: dict, cfg, vq: Path | None, run: Path) -> dict:
    """Our full state -> the released layout of ``cfg.family`` (Janus-Pro: with the VQ-16 at ``vq``,
    default the run recipe's ``init.vq``)."""
    if cfg.family != "januspro":
        return ours_to_release(full, cfg)
    from image_codecs.vq16 import read_vq16_state

    vq = vq or load_recipe(run / "recipe.yaml").init.vq
    if vq is None:
        raise FileNotFoundError("--vq: a Janus-Pro release holds the VQ-16 tokenizer, which training checkpoints do "
                                "not; pass its weights (vq16.safetensors from import-release) or set init.vq")
    return januspro.ours_to_release(full, read_vq16_state(vq), cfg)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pretrain.export", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--run", required=True, type=Path, help="the run's train.output_dir")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    parser.add_argument("--weights", choices=["ema", "raw"], default="ema", help="EMA averages (default) or raw weights")
    parser.add_argument("--format", choices=["release", "ours"], default="release",
                        help="release: folder with config.json + model.safetensors in DeepSeek's layout; ours: one safetensors file")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--vq", type=Path, default=None,
                        help="Janus-Pro, release format: the VQ-16 weights (default: the run recipe's init.vq)")
    args = parser.parse_args(argv)
    try:
        check_output(args.out, args.format)
        full, cfg, tag = run_weights(args.run, args.tag, args.weights)
        if args.format == "ours":
            # What import-release writes too: the samplers and the chat read the model from it.
            meta = {"model_config": json.dumps(dataclasses.asdict(cfg)), "source": f"{args.run} {tag} {args.weights}"}
            save_state(full, args.out, meta)
        else:
            release = release_state(full, cfg, args.vq, args.run)
            args.out.mkdir(parents=True, exist_ok=True)
            save_state(release, args.out / "model.safetensors")
            (args.out / "config.json").write_text(json.dumps(release_config(cfg, args.out), indent=2))
    except (FileNotFoundError, ValueError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the output could not be written (permissions, a full disk)
        print(f"error: {err.filename or args.out}: {err.strerror or err}", file=sys.stderr)
        return 2
    print(f"exported {args.weights} weights of {args.run}/checkpoints/{tag} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
