"""Starting weights of a training run, from local paths in the recipe's ``init`` section.

- ``init.janusflow``: a released JanusFlow checkpoint (folder with config.json and safetensors, or
  one safetensors file) -> the whole model; the REPA projector, absent from releases, stays fresh.
- ``init.januspro``: a Janus-Pro checkpoint in our names (``python -m pretrain.convert import-release``
  writes one from the released layout; a file still in the released names is converted on load when
  ``pretrain.convert.januspro`` offers ``release_to_ours``) -> the whole model, every tensor required.
- ``init.llm``: an HF Llama / DeepSeek-LLM folder (safetensors) -> the LLM, sharded for this rank.
- ``init.siglip``: an HF SigLIP folder (safetensors; a full SiglipModel or a vision tower) -> the
  understanding encoder. Its text tower and pooling head are not used and are skipped.
Everything else (aligners, generation modules) starts from its fresh initialisation, which is
stage 1 of the paper. Shapes are checked strictly; every problem is listed in one error. Every
file is read through ``convert.state.load_state``, its errors naming the recipe key (a sharded folder is checked against its HF index:
a shard it names but the folder lacks is an incomplete download) and what is loaded through ``_check_values``: a tensor holding NaN or inf, or an integer or
bool tensor, is refused naming the recipe key and the tensor (``copy_`` would otherwise cast or copy
it into the run without a word). An ``init.llm`` folder's config.json must describe ``model.llm``:
a checkpoint with another head count or RoPE base has the very same shapes and would load silently
(the same for ``init.siglip`` against ``model.und_encoder``).
"""

from __future__ import annotations

from pathlib import Path

from ..convert.llama import hf_to_megatron, llm_config_from_hf, shard_llm_state
from ..convert.release import NOT_RELEASED, check_language_config, errors_naming, read_json_file, release_to_ours
from ..convert.state import first_non_finite, load_model_state, load_module_state, load_state, tensor_parallel_slot
from ..recipe import InitConfig

def _read_checkpoint(path: str | Path, source: str) -> dict:
    """``load_state`` of the recipe path ``source`` (``init.<key>=<path>``), its errors starting with
    that key: the file a message names may be one of several the recipe points at."""
    try:
        return load_state(path)
    except (FileNotFoundError, ValueError) as err:  # every error of load_state takes one message
        raise type(err)(f"{source}: {err}") from None


def _check_values(state: dict, source: str) -> dict:
    """``state`` (the tensors about to be loaded) when it holds only finite floating-point values.

    Both would load without error but wrong: ``copy_`` casts an integer or bool tensor (a quantised or
    corrupted export) silently, and NaN/inf only shows later as a diverged run. float16/bfloat16 are
    fine: they are cast to the parameter's dtype like any release. Judged on what is loaded, so the
    parts a source may carry but we skip (a SigLIP text tower, Janus-Pro's VQ-16) are not."""
    bad = [f"{k} ({v.dtype})" for k, v in state.items() if not v.is_floating_point()]
    if bad:
        raise ValueError(f"{source}: {len(bad)} tensor(s) are not floating point, e.g. {bad[0]}: these are not "
                         "trainable weights (a quantised or damaged export); use the float/bf16 release")
    key = first_non_finite(state)
    if key is not None:
        raise ValueError(f"{source}: tensor {key!r} holds NaN or inf values: the weights are damaged (a diverged "
                         "run or a bad conversion); use another checkpoint")
    return state


def _folder_config(path: str | Path) -> Path | None:
    """The config.json of a checkpoint folder, or None (a single file, or a folder without one)."""
    config_path = Path(path) / "config.json"
    return config_path if Path(path).is_dir() and config_path.is_file() else None


def _check_llm_config(path: str | Path, cfg, source: str) -> None:
    """The folder's config.json (when there is one) against ``model.llm``: every difference in one error."""
    config_path = _folder_config(path)
    if config_path is None:
        return
    config = read_json_file(config_path)
    with errors_naming(config_path):
        check_language_config({"language_config": config})  # an HF Llama config.json is a language_config
        theirs = llm_config_from_hf(config)
    fields = ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads", "query_groups",
              "rope_theta", "norm_eps")
    diff = [f"{f}: checkpoint {getattr(theirs, f)}, recipe {getattr(cfg, f)}"
            for f in fields if getattr(theirs, f) != getattr(cfg, f)]
    if diff:
        raise ValueError(f"{source}: {config_path} describes another LLM than model.llm ({'; '.join(diff)}): "
                         "point init.llm at the matching checkpoint or fix model.llm")


def _strip_prefix(state: dict, prefixes: tuple[str, ...]) -> dict:
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out


# SigLIP config.json fields -> ours. hidden_act is not compared: HF's SigLIP folders say
# gelu_pytorch_tanh while our tower runs the released exact GELU on purpose (``build_siglip_config``).
_SIGLIP_FIELDS = {"hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
                  "num_hidden_layers": "num_layers", "num_attention_heads": "num_attention_heads",
                  "image_size": "image_size", "patch_size": "patch_size", "layer_norm_eps": "layer_norm_eps"}


def _check_siglip_config(path: str | Path, cfg, source: str) -> None:
    """The folder's config.json (a SiglipVisionConfig, or a SiglipModel's with ``vision_config``), when
    there is one, against ``model.und_encoder``: another head count or norm eps keeps every shape."""
    config_path = _folder_config(path)
    if config_path is None:
        return
    config = read_json_file(config_path)
    if isinstance(config, dict) and isinstance(config.get("vision_config"), dict):
        config = config["vision_config"]
    if not isinstance(config, dict):
        raise ValueError(f"{source}: {config_path}: expected a JSON object (a SigLIP config.json)")
    diff = [f"{theirs}: checkpoint {config[theirs]!r}, recipe {getattr(cfg, ours)!r}"
            for theirs, ours in _SIGLIP_FIELDS.items() if theirs in config and config[theirs] != getattr(cfg, ours)]
    if diff:
        raise ValueError(f"{source}: {config_path} describes another SigLIP than model.und_encoder "
                         f"({'; '.join(diff)}): point init.siglip at the matching checkpoint or fix model.und_encoder")


def load_llm_weights(model, path: str | Path, layout=None) -> None:
    """HF Llama weights -> this rank's share of ``model.llm`` (a stage of either family; ``layout``:
    the model's ``ParallelLayout``; None for a world of one)."""
    source = f"init.llm={path}"
    _check_llm_config(path, model.cfg.llm, source)
    hf = _check_values(_read_checkpoint(path, source), source)
    full = hf_to_megatron(hf, model.cfg.llm)
    tp_rank, tp_size = tensor_parallel_slot(model, layout)
    local = shard_llm_state(
        full, model.cfg.llm, tp_rank, tp_size, model.llm.layer_numbers, model.pre_process, model.post_process
    )
    load_module_state(model.llm, local)


def load_siglip_weights(model, path: str | Path) -> None:
    """HF SigLIP weights -> ``model.und_encoder`` (first pipeline stage only)."""
    if not model.pre_process:
        return
    source = f"init.siglip={path}"
    _check_siglip_config(path, model.cfg.und_encoder, source)
    state = _read_checkpoint(path, source)
    vision = {k: v for k, v in state.items() if not k.startswith(("text_model.", "logit_", "vision_model.head."))}
    vision = _check_values(_strip_prefix(vision, ("vision_model.", "tower.")), source)
    load_module_state(model.und_encoder.tower, vision)


def januspro_state(path: str | Path, cfg) -> dict:
    """Our full Janus-Pro state from ``path``: our names as they are, the released names (keys under
    ``language_model.``) through the release converter."""
    source = f"init.januspro={path}"
    state = _read_checkpoint(path, source)
    if not any(k.startswith("language_model.") for k in state):
        return _check_values(state, source)
    try:
        from ..convert.januspro import release_to_ours as januspro_release_to_ours
    except ImportError:
        raise ValueError(f"init.januspro={path}: a checkpoint in the released layout; convert it first with "
                         "python -m pretrain.convert import-release") from None
    return _check_values(januspro_release_to_ours(state, cfg), source)


def load_initial_weights(model, init: InitConfig, layout=None) -> list[str]:
    """Apply the recipe's ``init`` paths to ``model`` (a stage of either family); returns a line per
    source for the log."""
    done = []
    family = model.cfg.family
    for key in ("janusflow", "januspro"):
        if getattr(init, key) and key != family:
            raise ValueError(f"init.{key} is set but model.family is {family!r}: use init.{family}")
    if init.januspro:
        load_model_state(model, januspro_state(init.januspro, model.cfg), layout=layout)
        done.append(f"Janus-Pro weights from {init.januspro}")
    if init.janusflow:
        source = f"init.janusflow={init.janusflow}"
        ours = _check_values(release_to_ours(_read_checkpoint(init.janusflow, source), model.cfg), source)
        fresh = load_model_state(model, ours, keep_fresh=NOT_RELEASED, layout=layout)
        done.append(f"JanusFlow weights from {init.janusflow} ({len(fresh)} tensors left fresh: REPA projector)")
    if init.llm:
        load_llm_weights(model, init.llm, layout)
        done.append(f"LLM weights from {init.llm}")
    if init.siglip:
        load_siglip_weights(model, init.siglip)
        done.append(f"SigLIP weights from {init.siglip}")
    return done
