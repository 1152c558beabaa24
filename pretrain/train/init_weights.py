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
stage 1 of the paper. Shapes are checked strictly; every problem is listed in one error.
"""

from __future__ import annotations

from pathlib import Path

from ..convert.llama import hf_to_megatron, shard_llm_state
from ..convert.release import NOT_RELEASED, release_to_ours
from ..convert.state import load_model_state, load_module_state, load_state, tensor_parallel_slot
from ..recipe import InitConfig


def _strip_prefix(state: dict, prefixes: tuple[str, ...]) -> dict:
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out


def load_llm_weights(model, path: str | Path, layout=None) -> None:
    """HF Llama weights -> this rank's share of ``model.llm`` (a stage of either family; ``layout``:
    the model's ``ParallelLayout``; None for a world of one)."""
    hf = load_state(path)
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
    state = load_state(path)
    vision = {k: v for k, v in state.items() if not k.startswith(("text_model.", "logit_", "vision_model.head."))}
    vision = _strip_prefix(vision, ("vision_model.", "tower."))
    load_module_state(model.und_encoder.tower, vision)


def januspro_state(path: str | Path, cfg) -> dict:
    """Our full Janus-Pro state from ``path``: our names as they are, the released names (keys under
    ``language_model.``) through the release converter."""
    state = load_state(path)
    if not any(k.startswith("language_model.") for k in state):
        return state
    try:
        from ..convert.januspro import release_to_ours as januspro_release_to_ours
    except ImportError:
        raise ValueError(f"init.januspro={path}: a checkpoint in the released layout; convert it first with "
                         "python -m pretrain.convert import-release") from None
    return januspro_release_to_ours(state, cfg)


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
        ours = release_to_ours(load_state(init.janusflow), model.cfg)
        fresh = load_model_state(model, ours, keep_fresh=NOT_RELEASED, layout=layout)
        done.append(f"JanusFlow weights from {init.janusflow} ({len(fresh)} tensors left fresh: REPA projector)")
    if init.llm:
        load_llm_weights(model, init.llm, layout)
        done.append(f"LLM weights from {init.llm}")
    if init.siglip:
        load_siglip_weights(model, init.siglip)
        done.append(f"SigLIP weights from {init.siglip}")
    return done
