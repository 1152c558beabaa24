"""Our full model state read back from a checkpoint of any layout (tensor- and pipeline-parallel
shards gathered, EMA fragments of every data-parallel rank put together), outside training: export,
universal conversion and a stage that starts from the previous stage's checkpoint use it. Every file
read is first checked against the checkpoint's manifest.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .checkpoint import _describe, _read_ema_file
from .safe_load import CheckpointError, hash_problems, load_torch_file, read_manifest

_PIPELINE_FILE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
_MODEL_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")


def _stage_files(folder: Path) -> dict[int, list[Path]]:
    """{pipeline stage: model-state files of its tensor-parallel ranks, in rank order}."""
    stages: dict[int, dict[int, Path]] = {}
    for file in folder.iterdir():
        if match := _PIPELINE_FILE.match(file.name):
            stages.setdefault(int(match[1]), {})[int(match[2])] = file
    if not stages:  # trained without pipeline parallelism
        ranks = {int(m[1]): f for f in folder.iterdir() if (m := _MODEL_FILE.match(f.name))}
        stages = {0: ranks} if ranks else {}
    return {stage: [ranks[r] for r in sorted(ranks)] for stage, ranks in sorted(stages.items())}


def stage_layer_numbers(num_layers: int, pipeline_parallel: int, stage: int) -> list[int]:
    """Global 1-based transformer blocks of a pipeline stage (megatron-core's even split)."""
    per_stage = num_layers // pipeline_parallel
    return list(range(stage * per_stage + 1, (stage + 1) * per_stage + 1))


def checkpoint_weights(ckpt_dir: Path, tag: str, cfg, weights: str = "raw") -> dict[str, torch.Tensor]:
    """Our full model state (``pretrain.convert.state`` names) from a checkpoint of any layout.

    ``weights``: ``raw`` (the trained weights) or ``ema`` (the averages of the trained tensors over
    the raw frozen ones). Tensor-parallel shards are gathered per pipeline stage with the converter
    that shards them, and the stages are put together.
    """
    if weights not in ("raw", "ema"):
        raise ValueError(f"weights={weights!r}: expected 'raw' or 'ema'")
    folder = ckpt_dir / tag
    stages = _stage_files(folder)
    if not stages:
        raise FileNotFoundError(f"{folder}: no DeepSpeed model states (mp_rank_*_model_states.pt or "
                                "layer_*-model_*-model_states.pt)")
    pipelined = _PIPELINE_FILE.match(stages[0][0].name) is not None
    wanted = [f.name for files in stages.values() for f in files]
    if weights == "ema":
        wanted += [f.name for stage, files in stages.items() for tp in range(len(files))
                   for f in _ema_files(folder, tp, stage)]
    _verify_files(folder, wanted)
    full: dict[str, torch.Tensor] = {}
    for stage, files in stages.items():
        shards = []
        for tp_rank, file in enumerate(files):
            state = load_torch_file(file, map_location="cpu")
            # The pipeline engine saves our PipelineStage, whose parameters are ``model.*``.
            state = {k.removeprefix("model."): v for k, v in state.items()} if pipelined else state["module"]
            state = {k: v for k, v in state.items() if not k.endswith("._extra_state")}  # megatron's, empty
            if weights == "ema":
                state.update(_ema_shard(folder, tp_rank, stage))
            shards.append(state)
        full.update(_gather_stage(shards, cfg, len(stages), stage))
    return full


def checkpoint_ema(ckpt_dir: Path, tag: str, cfg) -> dict[str, torch.Tensor]:
    """The EMA of a checkpoint of any layout under full-state names: the averages of the trained
    tensors only (what ``ema_full.safetensors`` of a universal checkpoint holds)."""
    folder = ckpt_dir / tag
    stages = _stage_files(folder)
    full: dict[str, torch.Tensor] = {}
    for stage, files in stages.items():
        shards = [_ema_shard(folder, tp_rank, stage) for tp_rank in range(len(files))]
        full.update(_gather_stage(shards, cfg, len(stages), stage, subset=True))
    return full


def _ema_files(folder: Path, tp_rank: int, stage: int) -> list[Path]:
    """The EMA files of one model-parallel rank: one per data-parallel rank (fragments), or one
    file of whole tensors (checkpoints saved before the EMA was sharded)."""
    sharded = sorted(folder.glob(f"ema_mp{tp_rank}_{stage}_dp*.safetensors"))
    return sharded or [folder / f"ema_mp{tp_rank}_{stage}.safetensors"]


def _ema_shard(folder: Path, tp_rank: int, stage: int) -> dict[str, torch.Tensor]:
    """The whole EMA averages of one model-parallel rank (its tensor-parallel local tensors), put
    together from the fragments of every data-parallel rank."""
    from .ema import assemble_fragments

    files = _ema_files(folder, tp_rank, stage)
    if not files[0].exists():
        raise FileNotFoundError(f"{files[0]}: no EMA weights in this checkpoint; export --weights raw")
    parts = [_read_ema_file(f) for f in files]
    if parts[0][1] is None:
        return parts[0][0]
    try:
        return assemble_fragments(parts, what=f"{folder} EMA of tensor rank {tp_rank}, stage {stage}")
    except ValueError as err:
        raise CheckpointError(f"{err}; export --weights raw, or use an earlier checkpoint") from None


def _verify_files(folder: Path, names: list[str]) -> None:
    """Check the files a reader is about to open against the manifest (size and SHA-256); a
    checkpoint without a manifest (saved before manifests existed) is read unverified."""
    manifest = read_manifest(folder)
    if manifest is None:
        return
    present = [n for n in names if (folder / n).exists() or n in manifest["files"]]
    problems = hash_problems(folder, manifest, names=present)
    if problems:
        raise CheckpointError(f"{_describe(problems)}; use an earlier checkpoint (--tag / train.init_from)")


def _gather_stage(shards: list[dict], cfg, num_stages: int, stage: int, subset: bool = False) -> dict:
    """Full-state tensors of one pipeline stage from the local states of its tensor-parallel ranks
    (``subset``: the tensors the shards hold, else every tensor of the stage)."""
    from ..convert.llama import full_llm_keys, gather_llm_shards
    from ..convert.state import LLM_PREFIX

    llm_shards = [{k[len(LLM_PREFIX):]: v for k, v in s.items() if k.startswith(LLM_PREFIX)} for s in shards]
    layers = stage_layer_numbers(cfg.llm.num_layers, num_stages, stage)
    if not subset:
        # The gather takes the tensors the config names; a checkpoint saved with more layers than
        # the recipe now says would otherwise lose the rest without a word.
        wanted = set(full_llm_keys(layers, stage == 0, stage == num_stages - 1))
        extra, lacking = sorted(set(llm_shards[0]) - wanted), sorted(wanted - set(llm_shards[0]))
        if lacking:
            raise ValueError(f"the checkpoint lacks {len(lacking)} LLM tensors of model.llm (num_layers="
                             f"{cfg.llm.num_layers}), e.g. {LLM_PREFIX}{lacking[0]}: it was saved with another "
                             "model; use the recipe the run was trained with")
        if extra:
            raise ValueError(f"the checkpoint holds {len(extra)} LLM tensors that model.llm (num_layers="
                             f"{cfg.llm.num_layers}) has no place for, e.g. {LLM_PREFIX}{extra[0]}: it was saved "
                             "with another model; use the recipe the run was trained with")
    llm = gather_llm_shards(llm_shards, cfg.llm, layers, stage == 0, stage == num_stages - 1,
                            keys=list(llm_shards[0]) if subset else None)
    full = {LLM_PREFIX + k: v for k, v in llm.items()}
    # Modules outside the LLM are replicated over tensor-parallel ranks: take rank 0's.
    full.update({k: v for k, v in shards[0].items() if not k.startswith(LLM_PREFIX)})
    return full
