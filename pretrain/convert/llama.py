"""HF Llama / DeepSeek-LLM weights <-> megatron-core weights of our ``LanguageModel``; TP/PP sharding.

Pure functions over dicts of tensors: no process group, no module, no copy beyond what a layout change
needs (``torch.cat``); returned tensors may be views of the inputs.

Layouts (H hidden, F ffn, V vocab, Hq heads, G key/value groups, d = H / Hq head dim):
- HF: ``model.embed_tokens.weight`` [V, H], ``model.layers.N.self_attn.{q,k,v,o}_proj.weight``,
  ``model.layers.N.mlp.{gate,up,down}_proj.weight``, ``model.layers.N.{input,post_attention}_layernorm
  .weight``, ``model.norm.weight``, ``lm_head.weight`` [V, H] (untied).
- megatron, full: ``embedding.weight``, ``decoder.layers.{N}.*`` (N = global 0-based index),
  ``decoder.final_layernorm.weight``, ``output_layer.weight``. ``linear_qkv`` [(Hq + 2G) d, H] is
  interleaved per query group g: [q rows of the Hq/G heads of g, k rows of g, v rows of g];
  ``linear_fc1`` = cat([gate, up]) [2F, H]; ``pre_mlp_layernorm`` is HF's ``post_attention_layernorm``.
  RoPE uses the same half-split (rotate-half) layout in both, so q/k rows need no permutation.
- megatron, local (one TP rank of one pipeline stage): ``decoder.layers.{i}`` with local i, the layer
  whose global 1-based number is ``layer_numbers[i]``; embedding only on the first stage, final norm
  and output layer only on the last. TP splits: vocab rows of embedding/output layer; whole query
  groups of linear_qkv; cat([gate_r, up_r]) of linear_fc1; columns of linear_proj and linear_fc2.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Optional, Sequence

import torch

from ..model.config import LLMConfig
from . import check_shapes

Tensor = torch.Tensor
StateDict = dict[str, Tensor]

LAYER_KEYS = (
    "input_layernorm.weight",
    "self_attention.linear_qkv.weight",
    "self_attention.linear_proj.weight",
    "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.weight",
    "mlp.linear_fc2.weight",
)
# Buffers some HF checkpoints carry; recomputed from the config, so never part of the weights.
_HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def megatron_shapes(cfg: LLMConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the full megatron state of ``cfg``."""
    h, f, v, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size, cfg.head_dim
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.query_groups) * d
    layer_shapes = [(h,), (qkv_rows, h), (h, cfg.num_attention_heads * d), (h,), (2 * f, h), (h, f)]
    layer = dict(zip(LAYER_KEYS, layer_shapes))
    shapes: dict[str, tuple[int, ...]] = {"embedding.weight": (v, h)}
    for n in range(cfg.num_layers):
        shapes.update({f"decoder.layers.{n}.{k}": s for k, s in layer.items()})
    shapes["decoder.final_layernorm.weight"] = (h,)
    shapes["output_layer.weight"] = (v, h)
    return shapes


def hf_shapes(cfg: LLMConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the HF Llama state of ``cfg``."""
    h, f, v, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.query_groups * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        })
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


# transformers' LlamaConfig defaults: a config.json omits fields left at their default, and the
# official code then builds the model with these values.
_LLAMA_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "rope_scaling": None,
}


def llm_config_from_hf(hf_config: Mapping) -> LLMConfig:
    """An HF ``LlamaConfig`` as a dict (config.json, or JanusFlow's ``language_config``) -> LLMConfig.

    Absent fields take LlamaConfig's defaults, as the official code would. Features our LLM does not
    have (biases, tied embeddings, RoPE scaling, another activation) are all reported in one error.
    """
    c = {**_LLAMA_DEFAULTS, **hf_config}
    for key in ("rope_parameters", "rope_scaling"):
        if c.get(key) is not None and not isinstance(c[key], Mapping):
            raise ValueError(f"{key} must be an object or null, got {c[key]!r}")
    rope = c.get("rope_parameters") or {}  # transformers >= 5 nests the RoPE settings here
    scaling = c["rope_scaling"] or {}
    theta = rope.get("rope_theta", c["rope_theta"])
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    heads = c["num_attention_heads"]
    supported = {
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
    }
    problems = [f"{key}={c[key]!r} (supported: {ok!r})" for key, ok in supported.items() if c[key] != ok]
    # Another architecture (mistral's sliding window, qwen2's q/k/v biases, gemma's scaled embedding
    # and 1 + w norms) can have exactly Llama's tensor names and shapes: only the model_type tells.
    if c.get("model_type", "llama") != "llama":
        problems.append(f"model_type={c['model_type']!r} (supported: 'llama')")
    if rope_type != "default":
        problems.append(f"RoPE type {rope_type!r} (supported: 'default', no scaling)")
    if c.get("head_dim") not in (None, c["hidden_size"] // heads):
        problems.append(f"head_dim={c['head_dim']} (supported: hidden_size / num_attention_heads)")
    if problems:
        raise ValueError("unsupported Llama configuration: " + "; ".join(problems))
    kv = c.get("num_key_value_heads") or heads
    return LLMConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        ffn_hidden_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"],
        num_attention_heads=heads,
        num_query_groups=None if kv == heads else kv,
        rope_theta=float(theta),
        norm_eps=float(c["rms_norm_eps"]),
    )


def hf_config_dict(cfg: LLMConfig) -> dict:
    """The LlamaConfig fields (as config.json writes them) that describe ``cfg``."""
    return {
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.query_groups,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": False,
        "attention_bias": False,
    }


# ---------------------------------------------------------------------------------------------
# fused attention / MLP matrices
def pack_qkv(q: Tensor, k: Tensor, v: Tensor, cfg: LLMConfig) -> Tensor:
    """HF q [Hq d, H], k and v [G d, H] -> megatron's per-group interleaved [(Hq + 2G) d, H]."""
    groups, d = cfg.query_groups, cfg.head_dim
    per_group = cfg.num_attention_heads // groups
    hidden = q.shape[-1]
    q = q.reshape(groups, per_group * d, hidden)
    k = k.reshape(groups, d, hidden)
    v = v.reshape(groups, d, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def unpack_qkv(qkv: Tensor, cfg: LLMConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of ``pack_qkv``."""
    groups, d = cfg.query_groups, cfg.head_dim
    per_group = cfg.num_attention_heads // groups
    hidden = qkv.shape[-1]
    q, k, v = qkv.reshape(groups, (per_group + 2) * d, hidden).split([per_group * d, d, d], dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


# ---------------------------------------------------------------------------------------------
# HF <-> full megatron
def hf_to_megatron(hf: Mapping[str, Tensor], cfg: LLMConfig) -> StateDict:
    """HF Llama state -> full megatron state. Raises ``StateDictError`` listing every missing,
    unexpected or wrong-shape key."""
    hf = {k: t for k, t in hf.items() if not k.endswith(_HF_IGNORED_SUFFIXES)}
    check_shapes(hf_shapes(cfg), hf, "HF Llama state")
    out: StateDict = {"embedding.weight": hf["model.embed_tokens.weight"]}
    for n in range(cfg.num_layers):
        p, m = f"model.layers.{n}.", f"decoder.layers.{n}."
        out[m + "input_layernorm.weight"] = hf[p + "input_layernorm.weight"]
        q, k, v = (hf[f"{p}self_attn.{x}_proj.weight"] for x in "qkv")
        out[m + "self_attention.linear_qkv.weight"] = pack_qkv(q, k, v, cfg)
        out[m + "self_attention.linear_proj.weight"] = hf[p + "self_attn.o_proj.weight"]
        out[m + "pre_mlp_layernorm.weight"] = hf[p + "post_attention_layernorm.weight"]
        out[m + "mlp.linear_fc1.weight"] = torch.cat([hf[f"{p}mlp.{x}_proj.weight"] for x in ("gate", "up")])
        out[m + "mlp.linear_fc2.weight"] = hf[p + "mlp.down_proj.weight"]
    out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
    out["output_layer.weight"] = hf["lm_head.weight"]
    return out


def megatron_to_hf(full: Mapping[str, Tensor], cfg: LLMConfig) -> StateDict:
    """Full megatron state -> HF Llama state (inverse of ``hf_to_megatron``, bit-exact)."""
    check_shapes(megatron_shapes(cfg), full, "megatron LLM state")
    f = cfg.ffn_hidden_size
    out: StateDict = {"model.embed_tokens.weight": full["embedding.weight"]}
    for n in range(cfg.num_layers):
        p, m = f"model.layers.{n}.", f"decoder.layers.{n}."
        q, k, v = unpack_qkv(full[m + "self_attention.linear_qkv.weight"], cfg)
        gate, up = full[m + "mlp.linear_fc1.weight"].split([f, f])
        out.update({
            p + "input_layernorm.weight": full[m + "input_layernorm.weight"],
            p + "self_attn.q_proj.weight": q,
            p + "self_attn.k_proj.weight": k,
            p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": full[m + "self_attention.linear_proj.weight"],
            p + "post_attention_layernorm.weight": full[m + "pre_mlp_layernorm.weight"],
            p + "mlp.gate_proj.weight": gate,
            p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": full[m + "mlp.linear_fc2.weight"],
        })
    out["model.norm.weight"] = full["decoder.final_layernorm.weight"]
    out["lm_head.weight"] = full["output_layer.weight"]
    return out


# ---------------------------------------------------------------------------------------------
# tensor / pipeline parallel shards
# How each tensor is split over tensor-parallel ranks: None = replicated, 0 = rows, 1 = columns,
# "glu" = rank r holds [gate_r; up_r] of [gate; up] (megatron's SwiGLU halves each local output).
# linear_qkv by rows gives each rank whole query groups, since its rows are interleaved per group.
_TP_SPLIT = {
    "embedding.weight": 0,
    "output_layer.weight": 0,
    "decoder.final_layernorm.weight": None,
    "input_layernorm.weight": None,
    "pre_mlp_layernorm.weight": None,
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_proj.weight": 1,
    "mlp.linear_fc1.weight": "glu",
    "mlp.linear_fc2.weight": 1,
}


def deepspeed_sharding_patterns(vocab_size: int) -> dict:
    """``_TP_SPLIT`` in DeepSpeed's universal-checkpoint vocabulary (saved with every checkpoint, so
    ``ds_to_universal`` can merge tensor-parallel slices): the split rules live only in ``_TP_SPLIT``."""
    from deepspeed.checkpoint import constants as c

    def pattern(key: str) -> str:
        return r"^llm\.(.*\.)?" + re.escape(key) + "$"

    vocabulary = ("embedding.weight", "output_layer.weight")  # split by rows = by vocabulary entries
    return {
        c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        # Our vocabulary is never padded (it must divide by TP), so nothing is stripped.
        c.ORIGINAL_VOCAB_SIZE: vocab_size,
        c.PADDED_VOCAB_SIZE: vocab_size,
        # Replicated on every TP rank: the LLM's unsplit tensors and every module outside the LLM.
        c.TP_REPLICATED_PARAMETER_PATTERNS: [pattern(k) for k, how in _TP_SPLIT.items() if how is None]
        + [r"^(?!llm\.)"],
        c.VOCABULARY_PARAMETER_PATTERNS: [pattern(k) for k in vocabulary],
        # Split on the input dimension (megatron's row-parallel linears).
        c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: [pattern(k) for k, how in _TP_SPLIT.items() if how == 1],
        # SwiGLU's fc1 holds [gate; up], each half split by rows.
        c.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0: [pattern(k) for k, how in _TP_SPLIT.items() if how == "glu"],
        # The other dim-0 splits (linear_qkv: per-group [q; k; v] blocks, whole groups per rank) are
        # DeepSpeed's default.
    }


def _split(tensor: Tensor, how, tp_size: int, tp_rank: int) -> Tensor:
    if how is None:
        return tensor
    if how == "glu":
        gate, up = tensor.chunk(2)
        return torch.cat([gate.chunk(tp_size)[tp_rank], up.chunk(tp_size)[tp_rank]])
    return tensor.chunk(tp_size, dim=how)[tp_rank]


def _join(parts: Sequence[Tensor], how) -> Tensor:
    if how is None:
        return parts[0]
    if how == "glu":
        gates, ups = zip(*(part.chunk(2) for part in parts))
        return torch.cat([*gates, *ups])
    return torch.cat(list(parts), dim=how)


def _stage_keys(layer_numbers: Sequence[int], pre_process: bool, post_process: bool):
    """(local key, full key, TP split) of every tensor of one pipeline stage."""
    ends = ("decoder.final_layernorm.weight", "output_layer.weight")
    keys = [("embedding.weight", "embedding.weight", 0)] if pre_process else []
    for i, number in enumerate(layer_numbers):
        local, full = f"decoder.layers.{i}.", f"decoder.layers.{number - 1}."
        keys += [(local + k, full + k, _TP_SPLIT[k]) for k in LAYER_KEYS]
    keys += [(k, k, _TP_SPLIT[k]) for k in ends] if post_process else []
    return keys


def _check_tp(cfg: LLMConfig, tp_size: int) -> None:
    sizes = {
        "num_attention_heads": cfg.num_attention_heads,
        "num_query_groups": cfg.query_groups,
        "ffn_hidden_size": cfg.ffn_hidden_size,
        "vocab_size": cfg.vocab_size,
    }
    bad = [f"{name}={value}" for name, value in sizes.items() if value % tp_size]
    if bad:
        raise ValueError(f"model.llm {', '.join(bad)} cannot be split over tensor_parallel={tp_size}")


def shard_llm_state(
    full: Mapping[str, Tensor],
    cfg: LLMConfig,
    tp_rank: int,
    tp_size: int,
    layer_numbers: Sequence[int],
    pre_process: bool,
    post_process: bool,
    keys: Optional[Iterable[str]] = None,
) -> StateDict:
    """The local state of TP rank ``tp_rank`` of the pipeline stage holding ``layer_numbers``
    (global, 1-based), from a full megatron state. Only the keys that stage needs are read;
    ``keys``: only these local keys (e.g. the trained tensors an EMA averages), default all."""
    _check_tp(cfg, tp_size)
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} outside tensor_parallel={tp_size}")
    stage = _select(_stage_keys(layer_numbers, pre_process, post_process), keys)
    return {local: _split(full[key], how, tp_size, tp_rank) for local, key, how in stage}


def gather_llm_shards(
    shards: Sequence[Mapping[str, Tensor]],
    cfg: LLMConfig,
    layer_numbers: Sequence[int],
    pre_process: bool,
    post_process: bool,
    keys: Optional[Iterable[str]] = None,
) -> StateDict:
    """Inverse of ``shard_llm_state``: the local states of all TP ranks of one stage, in rank order
    -> that stage's part of the full state (global layer indices). Replicated norms come from rank 0.
    ``keys``: only these local keys, default every tensor of the stage."""
    _check_tp(cfg, len(shards))
    stage = _select(_stage_keys(layer_numbers, pre_process, post_process), keys)
    return {key: _join([shard[local] for shard in shards], how) for local, key, how in stage}


def full_llm_keys(layer_numbers: Sequence[int], pre_process: bool, post_process: bool) -> dict[str, str]:
    """{local key: full key} of every tensor of one pipeline stage (global block indices)."""
    return {local: key for local, key, _ in _stage_keys(layer_numbers, pre_process, post_process)}


def _select(stage_keys: list, keys: Optional[Iterable[str]]) -> list:
    if keys is None:
        return stage_keys
    wanted = set(keys)
    unknown = wanted - {local for local, _, _ in stage_keys}
    if unknown:
        raise KeyError(f"not tensors of this pipeline stage: {sorted(unknown)[:10]}")
    return [entry for entry in stage_keys if entry[0] in wanted]
