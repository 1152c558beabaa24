"""Starting weights of a training run, from local paths in the recipe's ``init`` section.

- ``init.janusflow``: a released JanusFlow checkpoint (folder with config.json and safetensors, or
  one safetensors file) -> the whole model; the REPA projector, absent from releases, stays fresh.
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
from ..model.janusflow import JanusFlowModel
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


def load_llm_weights(model: JanusFlowModel, path: str | Path, layout=None) -> None:
    """HF Llama weights -> this rank's share of ``model.llm`` (``layout``: the model's
    ``ParallelLayout``; None for a world of one)."""
    hf = load_state(path)
    full = hf_to_megatron(hf, model.cfg.llm)
    tp_rank, tp_size = tensor_parallel_slot(model, layout)
    local = shard_llm_state(
        full, model.cfg.llm, tp_rank, tp_size, model.llm.layer_numbers, model.pre_process, model.post_process
    )
    load_module_state(model.llm, local)


def load_siglip_weights(model: JanusFlowModel, path: str | Path) -> None:
    """HF SigLIP weights -> ``model.und_encoder`` (first pipeline stage only)."""
    if not model.pre_process:
        return
    state = load_state(path)
    vision = {k: v for k, v in state.items() if not k.startswith(("text_model.", "logit_", "vision_model.head."))}
    vision = _strip_prefix(vision, ("vision_model.", "tower."))
    load_module_state(model.und_encoder.tower, vision)


def load_initial_weights(model: JanusFlowModel, init: InitConfig, layout=None) -> list[str]:
    """Apply the recipe's ``init`` paths; returns a line per source for the log."""
    done = []
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
