"""Our full state <-> the modules of one rank, strictly; safetensors files.

Our *full* state names every tensor as a single-process model stage (``JanusFlowModel`` or
``JanusProModel``) does, with global layer
indices in the LLM: ``llm.embedding.weight``, ``llm.decoder.layers.{n}.*`` (n = layer number - 1),
``llm.decoder.final_layernorm.weight``, ``llm.output_layer.weight``, then ``und_encoder.*``,
``und_aligner.*``, ``beg_of_und_embed``, ``gen_encoder.*``, ``gen_enc_aligner.*``, ``repa_projector.*``
(first-stage modules) and ``gen_dec_aligner_norm.*``, ``gen_dec_aligner.*``, ``gen_decoder.*`` (last
stage). megatron's ``*._extra_state`` entries are never part of it.

Checkpoint files are safetensors only: loading one can never run code (a pickled .bin/.pt can).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..model.config import ModelConfig
from ..model.gen_vision import GenerationDecoder, GenerationEncoder, RMSNorm
from ..model.und_vision import RepaProjector, UnderstandingEncoder
from . import check_shapes
from .llama import full_llm_keys, gather_llm_shards, megatron_shapes, shard_llm_state

StateDict = dict[str, torch.Tensor]
LLM_PREFIX = "llm."
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# HF's index of a sharded checkpoint ({"weight_map": {tensor: shard file}}), e.g. model.safetensors.index.json.
INDEX_SUFFIX = ".safetensors.index.json"


# ---------------------------------------------------------------------------------------------
# expected keys and shapes
def full_state_shapes(cfg: ModelConfig, include_repa: Optional[bool] = None) -> dict[str, tuple[int, ...]]:
    """Key -> shape of our full state for ``cfg`` (REPA projector iff ``cfg.repa.enabled`` unless
    ``include_repa`` says otherwise). Nothing is allocated: vision modules are built on ``meta``.

    The vision part mirrors ``JanusFlowModel.__init__`` (``JanusProModel.__init__`` for
    ``model.family: januspro``, whose state has no ``beg_of_und_embed``); tests check both agree.
    """
    if cfg.family == "januspro":
        return _januspro_state_shapes(cfg)
    hidden = cfg.llm.hidden_size
    with torch.device("meta"):
        parts: dict[str, nn.Module] = {
            "und_encoder": UnderstandingEncoder(cfg.und_encoder),
            "und_aligner": nn.Linear(cfg.und_encoder.hidden_size, hidden),
            "gen_encoder": GenerationEncoder(cfg.gen_vision, hidden),
            "gen_enc_aligner": nn.Linear(cfg.gen_vision.channels, hidden),
            "gen_dec_aligner_norm": RMSNorm(hidden, cfg.gen_vision.norm_eps),
            "gen_dec_aligner": nn.Linear(hidden, cfg.gen_vision.channels),
            "gen_decoder": GenerationDecoder(cfg.gen_vision, hidden),
        }
        if cfg.repa.enabled if include_repa is None else include_repa:
            parts["repa_projector"] = RepaProjector(
                hidden, cfg.repa.projector_hidden_size, cfg.und_encoder.hidden_size
            )
    shapes = {LLM_PREFIX + k: s for k, s in megatron_shapes(cfg.llm).items()}
    shapes["beg_of_und_embed"] = (1, hidden)
    for name, module in parts.items():
        shapes.update({f"{name}.{k}": tuple(t.shape) for k, t in module.state_dict().items()})
    return shapes


def _januspro_state_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    from ..model.januspro import GeluMLP

    hidden, tokens = cfg.llm.hidden_size, cfg.image_tokens
    with torch.device("meta"):
        parts: dict[str, nn.Module] = {
            "und_encoder": UnderstandingEncoder(cfg.und_encoder),
            "und_aligner": GeluMLP(cfg.und_encoder.hidden_size, hidden, hidden),
            "gen_embed": nn.Embedding(tokens.codebook_size, tokens.embed_dim),
            "gen_aligner": GeluMLP(tokens.embed_dim, hidden, hidden),
            "gen_head": GeluMLP(hidden, tokens.head_hidden_size or hidden, tokens.codebook_size),
        }
    shapes = {LLM_PREFIX + k: s for k, s in megatron_shapes(cfg.llm).items()}
    for name, module in parts.items():
        shapes.update({f"{name}.{k}": tuple(t.shape) for k, t in module.state_dict().items()})
    return shapes


def _module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters and persistent buffers by state-dict name, without megatron's
    ``_extra_state`` (None, or opaque bytes with Transformer Engine)."""
    return {
        k: v
        for k, v in module.state_dict(keep_vars=True).items()
        if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
    }


def tensor_parallel_slot(model: nn.Module, layout=None) -> tuple[int, int]:
    """(tp rank, tp size) of ``model``'s LLM slice: from ``layout`` (a ``ParallelLayout``), or (0, 1)
    for a model built in a world of one. A tensor-parallel model without its layout is refused
    rather than loaded as if it were whole."""
    if layout is not None:
        return layout.tp_rank, layout.tp_size
    built_for = model.llm.config.tensor_model_parallel_size
    if built_for != 1:
        raise ValueError(f"this model is split over tensor_parallel={built_for}: pass its parallel layout")
    return 0, 1


# ---------------------------------------------------------------------------------------------
# loading into modules
def load_module_state(
    module: nn.Module, state: Mapping[str, torch.Tensor], keep_fresh: Iterable[str] = ()
) -> list[str]:
    """Copy ``state`` (local names, as ``module.state_dict()``) into ``module``, strictly.

    Every missing key (except those starting with a ``keep_fresh`` prefix), unexpected key and
    wrong shape is reported in one ``StateDictError`` before anything is copied. Values are cast to
    the parameter's dtype and device. Returns the keys left at their current (fresh) values.
    """
    targets = _module_tensors(module)
    check_shapes(targets, state, f"state for {type(module).__name__}", may_be_missing=keep_fresh)
    with torch.no_grad():
        for key, value in state.items():
            targets[key].copy_(value)
    return sorted(k for k in targets if k not in state)


def load_model_state(
    model: nn.Module, full_state: Mapping[str, torch.Tensor], keep_fresh: Iterable[str] = (), layout=None
) -> list[str]:
    """Load this rank's share of our full state into ``model`` (a model stage of either family).

    The whole checkpoint is checked first against ``full_state_shapes(model.cfg)``, so every rank
    raises the same ``StateDictError`` listing every missing, unexpected and wrong-shape key. Then
    the LLM is sharded for the current megatron tensor-parallel rank and this stage's layer numbers,
    and the vision modules this stage owns are taken as they are.

    ``keep_fresh``: prefixes of non-LLM keys that may be absent, e.g. ``("repa_projector",)`` for a
    released checkpoint; returns the keys that kept their fresh initialisation. ``layout``: the
    ``ParallelLayout`` the model was built for (None: a world of one).
    """
    keep_fresh = tuple(keep_fresh)
    if any(p.startswith(LLM_PREFIX.rstrip(".")) for p in keep_fresh):
        raise ValueError("keep_fresh: the LLM cannot be left partly uninitialised")
    cfg: ModelConfig = model.cfg
    check_shapes(full_state_shapes(cfg), full_state, "checkpoint", may_be_missing=keep_fresh)
    llm_full = {k[len(LLM_PREFIX):]: v for k, v in full_state.items() if k.startswith(LLM_PREFIX)}
    tp_rank, tp_size = tensor_parallel_slot(model, layout)
    local = shard_llm_state(
        llm_full, cfg.llm, tp_rank, tp_size, model.llm.layer_numbers, model.pre_process, model.post_process
    )
    local = {LLM_PREFIX + k: v for k, v in local.items()}
    owned = {k.split(".")[0] for k in _module_tensors(model)} - {"llm"}
    local.update({k: v for k, v in full_state.items() if k.split(".")[0] in owned})
    return load_module_state(model, local, keep_fresh)


def full_model_state(model: nn.Module) -> StateDict:
    """Our full state of a single-process model (either family; TP = 1, one pipeline stage).

    Tensors are detached and may share memory with the parameters (clone them to keep a snapshot).
    """
    whole = model.pre_process and model.post_process
    if model.llm.config.tensor_model_parallel_size != 1 or not whole:
        raise ValueError("full_model_state needs the whole model in one process (TP = 1, PP = 1)")
    tensors = {k: v.detach() for k, v in _module_tensors(model).items()}
    local_llm = {k[len(LLM_PREFIX):]: v for k, v in tensors.items() if k.startswith(LLM_PREFIX)}
    llm = gather_llm_shards([local_llm], model.cfg.llm, model.llm.layer_numbers, True, True)
    out = {LLM_PREFIX + k: v for k, v in llm.items()}
    out.update({k: v for k, v in tensors.items() if not k.startswith(LLM_PREFIX)})
    return out


def full_tensor_names(model: nn.Module) -> dict[str, str]:
    """{local name: full-state name} of every tensor of this rank's stage (either family).

    The same on every tensor-parallel rank (its slices share the full tensor's name) and in every
    pipeline layout: the names DeepSpeed keys universal checkpoints by (``pretrain.train.engine``).
    """
    llm = full_llm_keys(model.llm.layer_numbers, model.pre_process, model.post_process)
    return {
        k: LLM_PREFIX + llm[k[len(LLM_PREFIX):]] if k.startswith(LLM_PREFIX) else k
        for k in _module_tensors(model)
    }


def local_slices(model: nn.Module, full_state: Mapping[str, torch.Tensor], keys: Iterable[str],
                 layout=None) -> StateDict:
    """This rank's values of the local tensors ``keys`` of ``model`` (its pipeline stage, its slice
    of the LLM's split tensors) from full-state tensors; ``full_state`` needs only theirs."""
    tp_rank, tp_size = tensor_parallel_slot(model, layout)
    keys = list(keys)
    llm_keys = [k[len(LLM_PREFIX):] for k in keys if k.startswith(LLM_PREFIX)]
    llm_full = {k[len(LLM_PREFIX):]: v for k, v in full_state.items() if k.startswith(LLM_PREFIX)}
    out = shard_llm_state(
        llm_full,
        model.cfg.llm,
        tp_rank,
        tp_size,
        model.llm.layer_numbers,
        model.pre_process,
        model.post_process,
        keys=llm_keys,
    )
    out = {LLM_PREFIX + k: v for k, v in out.items()}
    out.update({k: full_state[k] for k in keys if not k.startswith(LLM_PREFIX)})
    return out


# ---------------------------------------------------------------------------------------------
# safetensors files
class UnsafeCheckpointError(ValueError):
    """A checkpoint in a format that can run code when loaded (pickle)."""


class DamagedCheckpointError(ValueError):
    """A .safetensors file that cannot be parsed, or weights that hold NaN or inf."""


def _refuse(path: Path) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path}: only .safetensors checkpoints are read. Pickled formats ({', '.join(_PICKLE_SUFFIXES)}) "
        "can run arbitrary code when loaded; convert the file to safetensors with a tool and in an "
        "environment you trust, then pass the .safetensors file"
    )


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors file(s) of a checkpoint: ``path`` itself, or the ``*.safetensors`` shards of a
    directory (those its ``*.safetensors.index.json`` names, when it has one). Raises
    ``FileNotFoundError`` when there is none or a shard the index names is absent, and
    ``UnsafeCheckpointError`` for anything else."""
    path = Path(path)
    if path.suffix in _PICKLE_SUFFIXES:
        raise _refuse(path)
    if not path.exists():  # before the suffix test: a mistyped folder is not a pickled file
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            pickled = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
            if pickled:
                raise _refuse(path / pickled[0])
            raise FileNotFoundError(f"{path}: no *.safetensors file in this directory")
        for file in files:  # else safetensors fails with "No such device (os error 19)" or the like
            if file.is_dir():
                raise ValueError(f"{file}: a folder named like a checkpoint shard; move it out of the "
                                 "checkpoint folder")
            if not file.is_file():
                raise FileNotFoundError(f"{file}: a link to nothing, or not a regular file; replace it by "
                                        "the shard it stands for")
        weight_map = _index_weight_map(path)
        if weight_map is not None:
            _check_index_files(path, weight_map, files)
        return files
    if path.suffix != ".safetensors":
        raise _refuse(path)
    return [path]


def _index_file(folder: Path) -> Optional[Path]:
    indexes = sorted(folder.glob("*" + INDEX_SUFFIX))
    if len(indexes) > 1:
        raise ValueError(f"{folder}: {len(indexes)} checkpoint indexes ({', '.join(p.name for p in indexes)}): "
                         "keep the one of the checkpoint to read")
    return indexes[0] if indexes else None


def _index_weight_map(folder: Path) -> Optional[dict[str, str]]:
    """{tensor: shard file name} of the folder's HF index, or None without one. An unreadable index
    is refused: it is the only record of which shards make up the checkpoint."""
    index = _index_file(folder)
    if index is None:
        return None
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        ok = isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
    except (ValueError, KeyError, TypeError, RecursionError, OSError):  # JSON, UTF-8, not an object
        ok = False
    if not ok:
        raise ValueError(f"{index}: not a readable checkpoint index (JSON with a 'weight_map' object of "
                         "tensor: shard file); re-download it or remove it")
    return weight_map


def _check_index_files(folder: Path, weight_map: Mapping[str, str], files: list[Path]) -> None:
    """The shards the index names are exactly the folder's *.safetensors files (by name, in the folder).

    A missing shard would otherwise show only as a long list of missing tensors, not as the incomplete
    download it is; an unlisted file (a single-file ``model.safetensors`` next to the shards, a stray
    export) would be merged in or clash key by key."""
    index = _index_file(folder)
    named = sorted(set(weight_map.values()))
    outside = [s for s in named if Path(s).name != s or not s.endswith(".safetensors")]
    if outside:
        raise ValueError(f"{index}: names {outside[0]!r}, not a .safetensors file of {folder}; "
                         "re-download the index")
    absent = [s for s in named if not (folder / s).is_file()]
    if absent:
        raise FileNotFoundError(f"{index}: names {len(absent)} shard(s) not in {folder}, e.g. {absent[0]}: "
                                "the download is incomplete; fetch the missing files")
    unlisted = [f.name for f in files if f.name not in set(named)]
    if unlisted:
        raise ValueError(f"{folder / unlisted[0]}: not a shard named by {index.name} ({len(unlisted)} such "
                         "file(s)): a second checkpoint in the same folder; move it out, or pass the file itself")


def _check_shard_keys(file: Path, keys: Iterable[str], weight_map: Mapping[str, str]) -> None:
    """The tensors of one shard are those the index assigns to it: shards of two downloads (another
    revision) can hold the same key names and would mix silently."""
    keys = set(keys)
    claimed = {k for k, shard in weight_map.items() if shard == file.name}
    wrong = sorted(keys ^ claimed)
    if wrong:
        key = wrong[0]
        if key in claimed:
            what = f"lacks tensor {key!r}, which the index puts in this file"
        elif key in weight_map:
            what = f"holds tensor {key!r}, which the index puts in {weight_map[key]}"
        else:
            what = f"holds tensor {key!r}, which the index does not list"
        raise DamagedCheckpointError(
            f"{file}: {what} ({len(wrong)} such tensor(s)): the shards and the index disagree (files of "
            "different downloads?); re-download the checkpoint"
        )


def _damaged(file: Path, err: Exception) -> DamagedCheckpointError:
    # safetensors' own words ("header too small", "incomplete metadata, ...") say which damage.
    return DamagedCheckpointError(
        f"{file}: unreadable (truncated or damaged: {str(err).strip()}): re-export or re-download it"
    )


def read_metadata(file: str | Path) -> dict[str, str]:
    """The string metadata of one .safetensors file (``{}`` when it has none)."""
    try:
        with safe_open(str(file), "pt") as f:
            return dict(f.metadata() or {})
    except SafetensorError as err:
        raise _damaged(Path(file), err) from None


def first_non_finite(state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The first key whose floating-point tensor holds NaN or inf (None when all are finite)."""
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return key
    return None


def load_state(path: str | Path, require_finite: bool = False, require_float: bool = False) -> StateDict:
    """Read a safetensors file or a directory of safetensors shards into one dict (CPU tensors).

    A file safetensors cannot parse (empty, truncated, not safetensors) raises
    ``DamagedCheckpointError`` naming it, and so does a shard that does not hold what the folder's
    index says. ``require_finite``: also refuse, naming the file and the key, a floating tensor holding
    NaN or inf (a model loaded from it would only give black images or empty answers, without any
    other sign). ``require_float``: also refuse an integer or bool tensor (a quantised or damaged
    export, which a conversion would pass on and a load would cast without a word).
    """
    state: StateDict = {}
    files = checkpoint_files(path)
    weight_map = _index_weight_map(Path(path)) if Path(path).is_dir() else None
    for file in files:
        try:
            part = load_file(str(file))
        except SafetensorError as err:
            raise _damaged(file, err) from None
        if weight_map is not None:
            _check_shard_keys(file, part, weight_map)
        if require_float:
            bad = next((k for k, v in part.items() if not v.is_floating_point()), None)
            if bad is not None:
                raise DamagedCheckpointError(
                    f"{file}: tensor {bad!r} is {part[bad].dtype}, not floating point: these are not "
                    "trainable weights (a quantised or damaged export); use the float/bf16 release"
                )
        if require_finite:
            bad = first_non_finite(part)
            if bad is not None:
                raise DamagedCheckpointError(
                    f"{file}: tensor {bad!r} holds NaN or inf values: the weights are damaged (a diverged "
                    "run or a bad conversion); use another checkpoint"
                )
        clash = sorted(set(part) & set(state))
        if clash:
            raise ValueError(f"{file}: keys also in another shard, e.g. {clash[:3]}")
        state.update(part)
    return state


def creatable_folder(folder: Path, out: Path, option: str = "--out") -> Path:
    """The nearest existing one of ``folder`` and its parents, which ``out`` (written in or under
    ``folder``) needs to be a folder: ``ValueError`` naming ``option`` when it is a file instead.
    The CLIs call it before reading any weights, so a bad output path costs no loading."""
    existing = next(p for p in [folder, *folder.parents] if p.exists())  # a root always exists
    if not existing.is_dir():
        raise ValueError(f"{option} {out}: {existing} is a file, so no folder can be made under it")
    return existing


def save_state(
    state: Mapping[str, torch.Tensor], path: str | Path, metadata: Optional[dict[str, str]] = None
) -> Path:
    """Write ``state`` to one safetensors file (parent directories created), dtypes unchanged; the file
    appears under its name only once complete."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: the output must be a .safetensors file")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, seen = {}, set()
    for key, value in state.items():
        t = value.detach().cpu().contiguous()
        # safetensors refuses tensors sharing memory (e.g. q/k/v views of one fused matrix).
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[key] = t
    # Written under a temporary name then renamed: an interrupted or failed write (a full disk, a
    # kill) never leaves a file that looks like a complete checkpoint, nor destroys an older one. The
    # temporary name does not end in .safetensors, so no checkpoint folder reads it as a shard.
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        save_file(tensors, str(partial), metadata=metadata)
        with open(partial, "rb") as written:  # on disk before it takes the name: a power loss after the
            os.fsync(written.fileno())       # rename must not leave an empty file under it
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path
