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
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

RELEASE_PREFIX = "language_model."


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
    parser.add_argument("--latent-size", type=int, default=48,
                        help="side of the VAE latent for a released checkpoint (48 for 384 px)")
    parser.add_argument("--tokenizer",
                        help="local tokenizer folder (default: the checkpoint folder, as released)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                        help="weights dtype (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute whole sequences instead of using the key/value cache (slow; a check)")


def model_config_from_dict(data: Mapping[str, Any]):
    """``dataclasses.asdict(ModelConfig)`` (as stored in checkpoint metadata) -> ``ModelConfig``."""
    from ..model.config import (GenerationVisionConfig, ImageTokenConfig, LLMConfig, ModelConfig, RepaConfig,
                                UnderstandingEncoderConfig)

    sections = {"llm": LLMConfig, "und_encoder": UnderstandingEncoderConfig,
                "gen_vision": GenerationVisionConfig, "repa": RepaConfig, "image_tokens": ImageTokenConfig}
    unknown = sorted(set(data) - set(sections) - {"family"})
    if unknown:
        raise ValueError(f"model_config: unknown sections {unknown}")
    family = {"family": data["family"]} if "family" in data else {}
    return ModelConfig(**family, **{name: cls(**data[name]) for name, cls in sections.items() if name in data})


def _stored_model_config(checkpoint: Path) -> Optional[dict]:
    from safetensors import safe_open

    from ..convert.state import checkpoint_files

    for file in checkpoint_files(checkpoint):
        with safe_open(str(file), "pt") as f:
            meta = f.metadata() or {}
        if "model_config" in meta:
            return json.loads(meta["model_config"])
    return None


def resolve_model(
    checkpoint: str | Path,
    config: Optional[str | Path] = None,
    siglip: Optional[Mapping] = None,
    latent_size: int = 48,
):
    """(ModelConfig, our full state) for a checkpoint of either kind (see the module docstring)."""
    from ..convert import januspro
    from ..convert.release import config_from_release, release_to_ours
    from ..convert.state import load_state

    checkpoint = Path(checkpoint)
    state = load_state(checkpoint)
    is_release = any(k.startswith(RELEASE_PREFIX) for k in state)
    config_path = Path(config) if config else None
    if config_path is not None and config_path.is_dir():
        config_path = config_path / "config.json"
    if config_path is not None and config_path.suffix in (".yaml", ".yml"):
        from ..recipe import load_recipe

        cfg = load_recipe(config_path).model
    elif config_path is not None or is_release:
        if config_path is None:
            folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
            config_path = folder / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: config.json not found; pass --config")
        config_json = json.loads(config_path.read_text())
        if januspro.is_januspro_config(config_json):
            cfg = januspro.config_from_release(config_json, siglip)
        elif is_release:
            cfg = config_from_release(config_json, siglip, latent_size, {k: tuple(v.shape) for k, v in state.items()})
        else:  # config.json does not give the time-embedding width: read it from our weights
            time = state.get("gen_encoder.time_embed.linear_1.weight")
            shapes = None if time is None else {"vision_gen_enc_model.time_embed.linear_1.weight": tuple(time.shape)}
            cfg = config_from_release(config_json, siglip, latent_size, shapes)
    else:
        stored = _stored_model_config(checkpoint)
        if stored is None:
            raise ValueError(
                f"{checkpoint}: our state without model_config metadata; pass --config (a recipe YAML "
                "or an official config.json)"
            )
        cfg = model_config_from_dict(stored)
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
    """(model, cfg, tokenizer folder) from the options of ``add_model_arguments``; starts the runtime."""
    from ..runtime.distributed import init_runtime

    runtime = init_runtime()
    if runtime.world_size != 1:
        raise ValueError(f"sampling runs in one process; this launch has {runtime.world_size}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    siglip = json.loads(Path(args.siglip).read_text()) if args.siglip else None
    cfg, state = resolve_model(args.checkpoint, args.config, siglip, args.latent_size)
    model = build_inference_model(cfg, state, device, dtype)
    checkpoint = Path(args.checkpoint)
    tokenizer = args.tokenizer or str(checkpoint if checkpoint.is_dir() else checkpoint.parent)
    return model, cfg, tokenizer


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
