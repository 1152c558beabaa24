"""Convert checkpoints between the released JanusFlow / Janus-Pro layouts, HF Llama and ours (safetensors only).

Usage: ``python -m pretrain.convert {import-release,export-release,hf-llama-to-megatron} --help``.
The model configuration travels in the output file's metadata (``model_config`` / ``llm_config``,
JSON of our dataclass) so a converted file says what it holds. The family comes from the official
config.json (Janus-Pro: ``gen_head_config``; JanusFlow: ``vision_gen_enc_config``) or the recipe's
``model.family``. Janus-Pro's VQ-16 tokenizer is not part of the trained model: import writes it to
its own file (``vq16.safetensors`` next to the output), export reads it back (``--vq``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import StateDictError, januspro
from .llama import hf_to_megatron, llm_config_from_hf
from .release import (
    NOT_RELEASED,
    attn_pool_extras,
    check_language_config,
    config_from_release,
    errors_naming,
    json_type,
    ours_to_release,
    read_json_file,
    read_siglip_file,
    release_config_json,
    release_to_ours,
)
from .state import LLM_PREFIX, checkpoint_files, creatable_folder, load_state, save_state


def _config_next_to(checkpoint: Path, given: Optional[str]) -> Path:
    if given:
        path = Path(given)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"--config {path}: no such file")
        return path
    path = (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "config.json"
    if not path.exists():  # one that is there but not a file is named as such by read_json_file
        raise FileNotFoundError(f"{path}: no config.json next to the checkpoint; pass --config")
    return path


def _read_config(path: Path) -> dict:
    """An official config.json, checked as far as both families read it (errors name the file)."""
    config = read_json_file(path)
    with errors_naming(path):
        check_language_config(config)
    return config


def _read_siglip(path: Optional[str]) -> Optional[dict]:
    return None if path is None else read_siglip_file(path)


def check_output_file(out: Path, option: str = "--out") -> None:
    """Refuse an output .safetensors path that cannot be written, before any weight is read."""
    if out.suffix != ".safetensors":
        raise ValueError(f"{option} {out}: the output must be a .safetensors file")
    if out.is_dir():
        raise ValueError(f"{option} {out}: a folder; give a file name (e.g. {out / 'model.safetensors'})")
    creatable_folder(out.parent, out, option)


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file: through links, and by inode where both exist (on a
    case-insensitive file system Model.safetensors is model.safetensors)."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_not_input(out: Path, checkpoint: Path, option: str = "--out") -> None:
    """Refuse an output that would replace the checkpoint being read (the same file under any name)
    or land in its folder, where the next run would read it back as one more shard."""
    real, source = out.resolve(), checkpoint.resolve()
    if source.is_dir() and source in real.parents:
        raise ValueError(f"{option} {out}: inside the checkpoint folder {checkpoint}; write it elsewhere")
    if same_file(out, checkpoint):
        raise ValueError(f"{option} {out}: the checkpoint being converted; write to another file")


def _import_release(args) -> None:
    checkpoint = Path(args.checkpoint)
    check_output_file(Path(args.out))
    if args.vq_out:
        check_output_file(Path(args.vq_out), "--vq-out")
    checkpoint_files(checkpoint)  # a missing checkpoint is named as such, not as a missing config.json
    check_not_input(Path(args.out), checkpoint)
    if args.vq_out:
        check_not_input(Path(args.vq_out), checkpoint, "--vq-out")
    siglip = _read_siglip(args.siglip)
    config_path = _config_next_to(checkpoint, args.config)
    config = _read_config(config_path)
    release = load_state(checkpoint, require_finite=True)
    shapes = {k: tuple(v.shape) for k, v in release.items()}
    if januspro.is_januspro_config(config):
        _import_januspro(args, checkpoint, release, config, config_path, siglip)
        return
    with errors_naming(config_path):
        cfg = config_from_release(config, siglip, args.latent_size, shapes)
    ours = release_to_ours(release, cfg)
    meta = {"model_config": json.dumps(dataclasses.asdict(cfg)), "source": str(checkpoint)}
    out = save_state(ours, args.out, meta)
    print(f"wrote {len(ours)} tensors to {out}")
    print(f"not in the release, left freshly initialised by a model loading this: {', '.join(NOT_RELEASED)}")


def _import_januspro(args, checkpoint: Path, release: dict, config: dict, config_path: Path,
                     siglip: Optional[dict]) -> None:
    vq_out = Path(args.vq_out) if args.vq_out else Path(args.out).parent / januspro.VQ_FILE
    if same_file(vq_out, Path(args.out)):  # the VQ would replace the model just written
        raise ValueError(f"--out {args.out}: also where the VQ-16 tokenizer goes ({januspro.VQ_FILE} beside --out, "
                         "or --vq-out); give --out another name, or --vq-out another file")
    with errors_naming(config_path):
        cfg = januspro.config_from_release(config, siglip)
    ours, vq = januspro.release_to_ours(release, cfg), januspro.vq_state_from_release(release)
    meta = {"model_config": json.dumps(dataclasses.asdict(cfg)), "source": str(checkpoint)}
    out = save_state(ours, args.out, meta)
    vq_out = save_state(vq, vq_out, {"kind": "vq16", "source": str(checkpoint)})
    print(f"wrote {len(ours)} tensors to {out} and the VQ-16 tokenizer ({len(vq)} tensors) to {vq_out}")


def _export_januspro(args, state: dict, cfg, config_json: dict, out: Path) -> None:
    from image_codecs.vq16 import read_vq16_state

    vq_path = Path(args.vq) if args.vq else Path(args.state).parent / januspro.VQ_FILE
    if not vq_path.exists():
        raise FileNotFoundError(f"{vq_path}: the VQ-16 weights are needed for the released layout; pass --vq")
    extras = januspro.attn_pool_extras(load_state(args.extras)) if args.extras else None
    release = januspro.ours_to_release(state, read_vq16_state(vq_path), cfg, extras)
    save_state(release, out / "model.safetensors", {"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    print(f"wrote {len(release)} tensors and config.json to {out}")


def _export_release(args) -> None:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: an existing file; the release format writes a folder")
    checkpoint_files(args.state)
    # The release's weights file must not replace a file it is made from (the state, its extras, the VQ).
    written = out / "model.safetensors"
    for option, given in (("--state", args.state), ("--extras", args.extras), ("--vq", args.vq)):
        if given and same_file(written, Path(given)):
            raise ValueError(f"--out {out}: its model.safetensors would replace {option} {given}, which it is made "
                             "from; write the release to another folder")
    siglip = _read_siglip(args.siglip)
    config_path = _config_next_to(Path(args.state), args.config)
    # A release holding NaN/inf samples black images or empty answers for whoever downloads it.
    state = load_state(args.state, require_finite=True)
    name = next(iter(siglip)) if siglip and "width" not in siglip else None  # {name: entry}
    if config_path.suffix in (".yaml", ".yml"):
        from ..recipe import load_recipe

        with errors_naming(config_path):
            cfg = load_recipe(config_path).model
        if cfg.family == "januspro":
            _export_januspro(args, state, cfg, januspro.release_config_json(cfg, name), out)
            return
        config_json = release_config_json(cfg, name)
    else:
        config_json = _read_config(config_path)
        if januspro.is_januspro_config(config_json):
            with errors_naming(config_path):
                cfg = januspro.config_from_release(config_json, siglip)
            _export_januspro(args, state, cfg, config_json, out)
            return
        # config.json does not give the time-embedding width: read it from the weights.
        time = state.get("gen_encoder.time_embed.linear_1.weight")
        key = "vision_gen_enc_model.time_embed.linear_1.weight"
        shapes = None if time is None else {key: tuple(time.shape)}
        with errors_naming(config_path):
            cfg = config_from_release(config_json, siglip, args.latent_size, shapes)
    extras = attn_pool_extras(load_state(args.extras)) if args.extras else None
    release = ours_to_release(state, cfg, extras)
    save_state(release, out / "model.safetensors", {"format": "pt"})  # what transformers writes
    (out / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    print(f"wrote {len(release)} tensors and config.json to {out}")


def _read_hf_config(path: Path) -> dict:
    """An HF Llama config.json: a JSON object without duplicate keys (json keeps the last one silently,
    and a file saying two things does not say which one the weights were trained with)."""
    config = read_json_file(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object (an HF Llama config.json), got {json_type(config)}")

    def refuse_duplicates(pairs):
        obj = dict(pairs)
        if len(obj) < len(pairs):
            seen = set()
            twice = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise ValueError(f"{path}: key {twice!r} is given more than once; keep the right value only")
        return obj

    json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=refuse_duplicates)
    return config


def _check_layer_count(hf: dict, num_layers: int, checkpoint: Path, config_path: Path) -> None:
    """One line when config.json gives another layer count than the weights hold, rather than a list
    of every tensor of every layer in between (millions of lines, and as many GB, for a config.json
    saying num_hidden_layers=1000000)."""
    found = {int(m.group(1)) for m in map(re.compile(r"model\.layers\.(\d+)\.").match, hf) if m}
    held = max(found) + 1 if found else 0
    if held != num_layers:
        raise ValueError(f"{checkpoint}: holds {held} layers (model.layers.N) but {config_path} says "
                         f"num_hidden_layers={num_layers}: use the config.json of these weights")


def _hf_llama_to_megatron(args) -> None:
    checkpoint = Path(args.checkpoint)
    check_output_file(Path(args.out))
    checkpoint_files(checkpoint)  # a missing checkpoint is named as such, not as a missing config.json
    check_not_input(Path(args.out), checkpoint)
    config_path = _config_next_to(checkpoint, args.config)
    config = _read_hf_config(config_path)
    with errors_naming(config_path):
        check_language_config({"language_config": config})  # an HF Llama config.json is a language_config
        cfg = llm_config_from_hf(config)
    # Integer/bool or NaN/inf tensors would convert without a word and only fail (or diverge) in training.
    hf = load_state(checkpoint, require_finite=True, require_float=True)
    _check_layer_count(hf, cfg.num_layers, checkpoint, config_path)
    try:
        full = hf_to_megatron(hf, cfg)
    except StateDictError as err:
        raise ValueError(f"{checkpoint}: the weights do not match {config_path}; {err}") from None
    meta = {"llm_config": json.dumps(dataclasses.asdict(cfg)), "source": str(checkpoint)}
    out = save_state({LLM_PREFIX + k: v for k, v in full.items()}, args.out, meta)
    print(f"wrote {len(full)} tensors ({LLM_PREFIX}*, full megatron layout) to {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pretrain.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    checkpoint_help = "directory (config.json + *.safetensors) or a .safetensors file"
    imp = sub.add_parser("import-release", help="released JanusFlow / Janus-Pro checkpoint -> our full state")
    imp.add_argument("--checkpoint", required=True, help=f"released JanusFlow or Janus-Pro {checkpoint_help}")
    imp.add_argument("--out", required=True, help="output .safetensors file")
    imp.add_argument("--config", help="official config.json (default: next to the checkpoint)")
    imp.add_argument("--vq-out", help=f"Janus-Pro: where to write the VQ-16 tokenizer (default: {januspro.VQ_FILE} "
                                      "next to --out; init.vq and the samplers read it)")

    exp = sub.add_parser("export-release", help="our full state -> the released layout")
    exp.add_argument("--state", required=True, help="our full state (.safetensors)")
    exp.add_argument("--config", required=True, help="official config.json, or a recipe YAML (model section)")
    exp.add_argument("--out", required=True, help="output directory: model.safetensors + config.json")
    exp.add_argument("--extras", help="released checkpoint to copy the unused attn_pool.* from (else zeros)")
    exp.add_argument("--vq", help=f"Janus-Pro: the VQ-16 weights (default: {januspro.VQ_FILE} next to --state; "
                                  "or a released Janus-Pro checkpoint)")

    for p in (imp, exp):
        p.add_argument("--siglip", help="JSON with the SigLIP table entry when model_name is not a known one")
        p.add_argument("--latent-size", type=int, default=None,
                       help="JanusFlow: side of the VAE latent (default 48, for 384 px; our exports of "
                            "pixel-latent models record it in config.json)")

    hf = sub.add_parser("hf-llama-to-megatron", help="HF Llama / DeepSeek-LLM -> our full LLM state (llm.*)")
    hf.add_argument("--checkpoint", required=True, help=f"HF Llama {checkpoint_help}")
    hf.add_argument("--out", required=True, help="output .safetensors file")
    hf.add_argument("--config", help="HF config.json (default: next to the checkpoint)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "latent_size", None) is not None and args.latent_size < 1:
        parser.error(f"--latent-size: {args.latent_size} must be at least 1")
    commands = {
        "import-release": _import_release,
        "export-release": _export_release,
        "hf-llama-to-megatron": _hf_llama_to_megatron,
    }
    try:
        commands[args.command](args)
    except (ValueError, FileNotFoundError) as err:  # StateDictError and friends: a message, not a trace
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # an output that could not be written (permissions, a full disk)
        print(f"error: {err.filename or args.out}: {err.strerror or err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
