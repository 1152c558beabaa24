"""Loading a whole JanusFlow or Janus-Pro model for inference (one process), from either checkpoint kind:

- a released checkpoint (DeepSeek's layout, ``language_model.*`` keys): a folder with config.json
  and *.safetensors, imported through ``pretrain.convert.release`` (JanusFlow) or
  ``pretrain.convert.januspro`` (Janus-Pro: config.json has ``gen_head_config``);
- our full state (``llm.*`` keys, ``pretrain.convert.state.save_state``): one .safetensors file or
  a folder of shards; its config is the ``model_config`` metadata that ``python -m pretrain.convert
  import-release`` writes, or ``--config`` (a recipe YAML, whose ``model`` section is used, or an
  official config.json).

The family (``model.family``) comes from that config; the model class follows it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from ..cli_args import finite_number

RELEASE_PREFIX = "language_model."
SEED_LIMIT = 2**32  # --seed in [0, 2**32): every generator seed derived from it stays in range


# argparse ``type`` of a float option: NaN and inf are refused (they sample garbage or crash).
finite_float = finite_number()


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The checkpoint/config/device options both sampling CLIs share."""
    parser.add_argument(
        "--checkpoint", required=True,
        help="released JanusFlow / Janus-Pro folder (config.json + *.safetensors), or our full state "
             "(.safetensors file or folder, e.g. written by 'python -m pretrain.convert import-release')",
    )
    parser.add_argument(
        "--config",
        help="model config when the checkpoint does not carry one: a recipe YAML (its model section) or "
             "an official config.json (default: config.json next to a released checkpoint, or the "
             "model_config metadata of our state)",
    )
    parser.add_argument("--siglip", help="JSON with the SigLIP table entry when model_name is not a known one")
    parser.add_argument("--latent-size", type=int, default=None,
                        help="side of the VAE latent for a released checkpoint (default 48, for 384 px; our "
                             "exports of pixel-latent models record it in config.json)")
    parser.add_argument("--tokenizer",
                        help="local tokenizer folder (default: the checkpoint folder, as released)")
    parser.add_argument("--device", default=None,
                        help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                        help="weights dtype (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute whole sequences instead of using the key/value cache (slow; a check)")


def error_line(err: BaseException) -> str:
    """What a CLI prints after ``error: `` for ``err``: an OSError from the system as 'FILE: reason'
    (not '[Errno 2] ...'), anything else its message."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return str(err)


def check_model_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks of ``add_model_arguments``' options that need no file: ``parser.error`` (exit 2)
    before anything is loaded."""
    if args.latent_size is not None and args.latent_size < 1:
        parser.error(f"--latent-size: {args.latent_size} must be at least 1")
    try:
        resolve_device(args.device)
    except ValueError as err:
        parser.error(str(err))


def check_seed(parser: argparse.ArgumentParser, seed: int) -> None:
    if not 0 <= seed < SEED_LIMIT:
        parser.error(f"--seed: {seed} must be between 0 and {SEED_LIMIT - 1}")


def resolve_device(name: Optional[str]) -> torch.device:
    """``--device`` as a ``torch.device`` (default: cuda when available); one that this machine cannot
    run on raises ``ValueError`` saying why, before any weight is read."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _field_ok(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a dataclass field's annotation (int, float, bool, str, Optional)."""
    if typing.get_origin(hint) is typing.Union:
        return any(_field_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):  # JSON true is a Python int: never a number here
        return False
    if hint is int:
        return isinstance(value, int)
    if hint is float:
        return isinstance(value, (int, float))
    if hint is str:
        return isinstance(value, str)
    return True  # an annotation this check does not know: the dataclass checks it


def _section_from_dict(cls, values: Any, where: str):
    """One dataclass of the model config from its dict, every key and type checked (a checkpoint
    written by another version of this code may have keys or types this one does not know)."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (written by another version of this code?)")
    for key, value in values.items():
        if not _field_ok(value, hints[key]):
            need = str(hints[key]).replace("typing.", "").replace("<class '", "").replace("'>", "")
            raise ValueError(f"{where}.{key}: expected {need}, got {json.dumps(value)}")
    return cls(**{k: float(v) if hints[k] is float else v for k, v in values.items()})


def model_config_from_dict(data: Any):
    """``dataclasses.asdict(ModelConfig)`` (as stored in checkpoint metadata) -> ``ModelConfig``.
    An unknown section or key, or a value of the wrong type, raises ``ValueError`` naming it."""
    from ..model.config import (GenerationVisionConfig, ImageTokenConfig, LLMConfig, ModelConfig, RepaConfig,
                                UnderstandingEncoderConfig)

    sections = {"llm": LLMConfig, "und_encoder": UnderstandingEncoderConfig,
                "gen_vision": GenerationVisionConfig, "repa": RepaConfig, "image_tokens": ImageTokenConfig}
    if not isinstance(data, Mapping):
        raise ValueError(f"model_config: expected an object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(sections) - {"family"})
    if unknown:
        raise ValueError(f"model_config: unknown sections {unknown}")
    if "family" in data and not isinstance(data["family"], str):
        raise ValueError(f"model_config.family: expected str, got {json.dumps(data['family'])}")
    family = {"family": data["family"]} if "family" in data else {}
    parts = {name: _section_from_dict(cls, data[name], f"model_config.{name}")
             for name, cls in sections.items() if name in data}
    return ModelConfig(**family, **parts)


def _stored_model_config(checkpoint: Path):
    """The ``ModelConfig`` in the first ``model_config`` metadata of the checkpoint's files (None
    when there is none); a damaged or foreign one raises ``ValueError`` naming the file."""
    from ..convert.state import checkpoint_files, read_metadata

    for file in checkpoint_files(checkpoint):
        meta = read_metadata(file)
        if "model_config" not in meta:
            continue
        try:
            return model_config_from_dict(json.loads(meta["model_config"]))
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}: the model_config metadata is not valid JSON ({err.msg}); "
                             "pass --config (a recipe YAML or an official config.json)") from None
        except ValueError as err:  # ConfigError too: an impossible architecture
            raise ValueError(f"{file}: {err}") from None
    return None


def resolve_model(
    checkpoint: str | Path,
    config: Optional[str | Path] = None,
    siglip: Optional[Mapping] = None,
    latent_size: Optional[int] = None,
):
    """(ModelConfig, our full state) for a checkpoint of either kind (see the module docstring).

    Every problem of the inputs (a missing, damaged or foreign file, weights holding NaN or inf)
    raises ``ValueError`` or ``FileNotFoundError`` with one line naming the file."""
    from ..convert import januspro
    from ..convert.release import check_language_config, config_from_release, errors_naming, read_json_file
    from ..convert.release import release_to_ours
    from ..convert.state import load_state

    checkpoint = Path(checkpoint)
    config_path = Path(config) if config else None
    if config_path is not None and config_path.is_dir():
        config_path = config_path / "config.json"
    if config_path is not None and not config_path.is_file():  # before the weights are read
        raise FileNotFoundError(f"--config {config_path}: no such file")
    # Weights holding NaN or inf would give black images or empty answers with exit 0.
    state = load_state(checkpoint, require_finite=True)
    is_release = any(k.startswith(RELEASE_PREFIX) for k in state)
    if config_path is not None and config_path.suffix in (".yaml", ".yml"):
        from ..recipe import load_recipe

        with errors_naming(config_path):
            cfg = load_recipe(config_path).model
    elif config_path is not None or is_release:
        if config_path is None:
            folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
            config_path = folder / "config.json"
            if not config_path.is_file():
                raise FileNotFoundError(f"{config_path}: no config.json next to the released checkpoint; "
                                        "pass --config")
        config_json = read_json_file(config_path)
        with errors_naming(config_path):
            check_language_config(config_json)
            if januspro.is_januspro_config(config_json):
                cfg = januspro.config_from_release(config_json, siglip)
            elif is_release:
                shapes = {k: tuple(v.shape) for k, v in state.items()}
                cfg = config_from_release(config_json, siglip, latent_size, shapes)
            else:  # config.json does not give the time-embedding width: read it from our weights
                time = state.get("gen_encoder.time_embed.linear_1.weight")
                key = "vision_gen_enc_model.time_embed.linear_1.weight"
                cfg = config_from_release(config_json, siglip, latent_size,
                                          None if time is None else {key: tuple(time.shape)})
    else:
        cfg = _stored_model_config(checkpoint)
        if cfg is None:
            raise ValueError(
                f"{checkpoint}: our state without model_config metadata; pass --config (a recipe YAML "
                "or an official config.json)"
            )
    if is_release:  # the VQ-16 part of a released Janus-Pro state is read by the sampler itself
        state = januspro.release_to_ours(state, cfg) if cfg.family == "januspro" else release_to_ours(state, cfg)
    return cfg, state


def build_inference_model(cfg, state: Mapping[str, torch.Tensor], device="cpu", dtype=torch.float32):
    """A whole ``JanusFlowModel`` or ``JanusProModel`` (``cfg.family``) holding ``state``, in eval mode
    on ``device``. Needs the runtime (``pretrain.runtime.distributed.init_runtime``) with tensor and
    pipeline parallel 1."""
    from ..convert.release import NOT_RELEASED
    from ..convert.state import load_model_state

    if cfg.family == "januspro":
        from ..model.januspro import JanusProModel

        model = JanusProModel(cfg, params_dtype=dtype)
        load_model_state(model, state)
        return model.to(device).eval()
    from ..model.janusflow import JanusFlowModel

    model = JanusFlowModel(cfg, params_dtype=dtype)
    load_model_state(model, state, keep_fresh=NOT_RELEASED)  # the REPA projector is never used here
    return model.to(device).eval()


def load_model_from_args(args: argparse.Namespace):
    """(model, cfg, tokenizer) from the options of ``add_model_arguments``; starts the runtime. The
    tokenizer (``--tokenizer``, default the checkpoint's folder) is loaded and checked against the
    model's vocabulary before the model is built."""
    from ..convert.release import read_siglip_file
    from ..runtime.distributed import init_runtime

    runtime = init_runtime()
    if runtime.world_size != 1:
        raise ValueError(f"sampling runs in one process; this launch has {runtime.world_size}")
    device = resolve_device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    siglip = read_siglip_file(args.siglip) if args.siglip else None
    cfg, state = resolve_model(args.checkpoint, args.config, siglip, args.latent_size)
    checkpoint = Path(args.checkpoint)
    folder = args.tokenizer or str(checkpoint if checkpoint.is_dir() else checkpoint.parent)
    tokenizer = load_model_tokenizer(folder, args.tokenizer is not None, cfg)
    model = build_inference_model(cfg, state, device, dtype)
    return model, cfg, tokenizer


def load_model_tokenizer(folder: str, given: bool, cfg):
    """The tokenizer of ``folder`` (``given``: named by --tokenizer, else the checkpoint's folder),
    refused when it has more tokens than the model's vocabulary (their ids would index past the
    embedding table)."""
    from datacontract.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(folder)
    except FileNotFoundError as err:
        if given:
            raise
        raise FileNotFoundError(f"{err}; pass --tokenizer") from None
    if len(tokenizer) > cfg.llm.vocab_size:
        raise ValueError(f"tokenizer {folder} has {len(tokenizer)} tokens but the model's vocabulary is "
                         f"{cfg.llm.vocab_size}: pass the tokenizer the model was trained with (--tokenizer)")
    return tokenizer


def describe(cfg) -> str:
    """One line saying what was loaded."""
    c = dataclasses.asdict(cfg)
    llm, gen = c["llm"], c["gen_vision"]
    head = f"LLM {llm['num_layers']} layers x {llm['hidden_size']}, vocab {llm['vocab_size']}"
    if cfg.family == "januspro":
        side = cfg.image_tokens.grid_side(cfg.und_encoder.image_size)
        return (f"Janus-Pro: {head}; images {side}x{side} codes of a {cfg.image_tokens.codebook_size}-code "
                f"{cfg.image_tokens.codec} codebook")
    return f"JanusFlow: {head}; latents {gen['latent_channels']}x{gen['latent_size']}x{gen['latent_size']}"
