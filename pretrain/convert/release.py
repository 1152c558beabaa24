"""The released JanusFlow checkpoint layout (DeepSeek's ``MultiModalityCausalLM``) <-> ours.

Release prefix                        ours
``language_model.*`` (HF Llama)       ``llm.*`` (megatron, via ``llama.hf_to_megatron``)
``vision_und_enc_model.vision_tower`` ``und_encoder.tower`` (timm ViT <-> HF SigLIP, see below)
``vision_und_enc_aligner``            ``und_aligner``
``beg_of_und_embed``                  ``beg_of_und_embed``
``vision_gen_enc_model``              ``gen_encoder``       (same sub-names)
``vision_gen_enc_aligner``            ``gen_enc_aligner``
``vision_gen_dec_aligner_norm``       ``gen_dec_aligner_norm``
``vision_gen_dec_aligner``            ``gen_dec_aligner``
``vision_gen_dec_model``              ``gen_decoder``       (same sub-names)
(none)                                ``repa_projector``    (training only: absent on import,
                                                             dropped on export)

SigLIP, timm -> HF: ``patch_embed.proj`` -> ``embeddings.patch_embedding``; ``pos_embed`` [1, P, D] ->
``embeddings.position_embedding.weight`` [P, D]; ``blocks.N.norm1/norm2`` -> ``encoder.layers.N.
layer_norm1/2``; ``blocks.N.attn.qkv`` [3D, D] (+ bias) -> ``self_attn.{q,k,v}_proj`` in that order;
``attn.proj`` -> ``self_attn.out_proj``; ``mlp.fc1/fc2`` -> ``mlp.fc1/fc2``; ``norm`` -> ``post_layernorm``.
The unused pooling head ``attn_pool.*`` is dropped on import.

Every conversion checks the whole input first and raises one ``StateDictError`` listing every missing,
unexpected and wrong-shape key. Tensors keep their dtype.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from ..model.config import GenerationVisionConfig, ModelConfig, RepaConfig, UnderstandingEncoderConfig
from . import check_shapes
from .llama import hf_config_dict, hf_to_megatron, llm_config_from_hf, megatron_to_hf
from .state import LLM_PREFIX, full_state_shapes

StateDict = dict[str, torch.Tensor]

RELEASE_LLM = "language_model."
RELEASE_SIGLIP = "vision_und_enc_model.vision_tower."
OUR_SIGLIP = "und_encoder.tower."
ATTN_POOL = RELEASE_SIGLIP + "attn_pool."
# Modules the release does not carry: pass these as ``keep_fresh`` to ``state.load_model_state``.
NOT_RELEASED = ("repa_projector",)
_RENAMES = (  # (release, ours), whole module names
    ("vision_und_enc_aligner", "und_aligner"),
    ("beg_of_und_embed", "beg_of_und_embed"),
    ("vision_gen_enc_model", "gen_encoder"),
    ("vision_gen_enc_aligner", "gen_enc_aligner"),
    ("vision_gen_dec_aligner_norm", "gen_dec_aligner_norm"),
    ("vision_gen_dec_aligner", "gen_dec_aligner"),
    ("vision_gen_dec_model", "gen_decoder"),
)
# The official SigLIP table entries we know (format of its model table; mlp = width * mlp_ratio).
SIGLIP_TABLE = {
    "siglip_large_patch16_384": {
        "image_size": 384, "patch_size": 16, "width": 1024, "layers": 24, "heads": 16, "mlp_ratio": 4,
    },
}
_SIGLIP_EPS = 1e-6  # timm's SigLIP towers use LayerNorm eps 1e-6


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
def _siglip_entry(name: str, siglip: Optional[Mapping]) -> Mapping:
    if siglip is not None:
        entry = siglip.get(name, siglip)  # {name: entry} as in the official table, or the entry itself
        if "width" not in entry:
            raise ValueError(f"siglip: no entry for {name!r} (keys: {sorted(siglip)})")
        return entry
    if name not in SIGLIP_TABLE:
        raise ValueError(
            f"SigLIP tower model_name={name!r} (config.json, vision tower params) is not in the SigLIP table "
            f"({sorted(SIGLIP_TABLE)}): pass its entry "
            "(image_size, patch_size, width, layers, heads, mlp_ratio)"
        )
    return SIGLIP_TABLE[name]


def _check_supported(enc: Mapping, dec: Mapping, und: Mapping, llm_hidden: int) -> None:
    """Raise one error naming every released setting our modules do not implement."""
    absent = [k for k in ("stride", "kernel_size", "block_out_channels", "layers_in_middle") if k not in enc]
    if absent:
        # The encoder's class defaults (kernel 7, stride 4) are not the released setting: never guess.
        raise ValueError(f"vision_gen_enc_config.params lacks {absent}")
    channels = enc["block_out_channels"][0]
    dec_channels = dec.get("block_out_channels", [channels])
    hidden = {enc.get("hidden_size", llm_hidden), dec.get("hidden_size", llm_hidden), llm_hidden}
    flags = [p.get(k, True) for p in (enc, dec) for k in ("use_mid_block", "elementwise_affine", "use_bias")]
    checks = {
        "encoder kernel_size == stride and padding 0":
            enc["kernel_size"] == enc["stride"] and enc.get("padding", 0) == 0,
        "one entry in block_out_channels": len(enc["block_out_channels"]) == 1 == len(dec_channels),
        "decoder block_out_channels[0] and in_channels == the encoder's width":
            dec_channels[0] == channels == dec.get("in_channels", channels),
        "2 ** decoder upsamples == encoder stride": 2 ** dec.get("upsamples", 1) == enc["stride"],
        "decoder out_channels == encoder input_channels":
            dec.get("out_channels", 4) == enc.get("input_channels", 4),
        **{f"same {k} in encoder and decoder": enc.get(k, d) == dec.get(k, d)
           for k, d in (("layers_in_middle", None), ("norm_eps", 1e-6))},
        "generation hidden_size == LLM hidden_size": len(hidden) == 1,
        "use_mid_block, elementwise_affine and use_bias true": all(flags),
        # "patch" would drop the first token, a class token SigLIP does not have
        "vision_und_enc_config select_feature 'same'": und.get("select_feature", "patch") == "same",
    }
    problems = [name for name, ok in checks.items() if not ok]
    if problems:
        raise ValueError("unsupported released configuration, expected: " + "; ".join(problems))


def siglip_config_from_release(und: Mapping, siglip: Optional[Mapping] = None) -> UnderstandingEncoderConfig:
    """The ``CLIPVisionTower`` params of config.json (``model_name``, ``image_size``, ``select_layer``)
    -> our SigLIP config. ``siglip``: the table entry when ``model_name`` is not in ``SIGLIP_TABLE``."""
    entry = _siglip_entry(und["model_name"], siglip)
    # As the official tower: select_layer <= 0 builds layers + select_layer + 1 blocks (-1: all,
    # its default -2 drops the last), a positive value that many; the final norm follows either way.
    select = und.get("select_layer", -2)
    depth = min(entry["layers"], entry["layers"] + select + 1 if select <= 0 else select)
    width = entry["width"]
    return UnderstandingEncoderConfig(
        image_size=und.get("image_size", entry["image_size"]),
        patch_size=entry["patch_size"],
        hidden_size=width,
        intermediate_size=int(width * entry["mlp_ratio"]),
        num_layers=depth,
        num_attention_heads=entry["heads"],
        layer_norm_eps=_SIGLIP_EPS,
    )


def siglip_tower_params(u: UnderstandingEncoderConfig, model_name: Optional[str] = None) -> dict:
    """Our SigLIP config -> the ``CLIPVisionTower`` params of config.json. The tower is named by
    ``model_name``, else by the ``SIGLIP_TABLE`` entry matching its dimensions (the official code only
    builds towers of its table)."""
    if model_name is None:
        dims = (u.image_size, u.patch_size, u.hidden_size, u.num_layers, u.num_attention_heads,
                u.intermediate_size)
        names = [
            n for n, e in SIGLIP_TABLE.items()
            if dims == (e["image_size"], e["patch_size"], e["width"], e["layers"], e["heads"],
                        e["width"] * e["mlp_ratio"])
        ]
        if not names:
            raise ValueError("model.und_encoder matches no SigLIP table entry: give siglip_model_name")
        model_name = names[0]
    return {"image_size": u.image_size, "model_name": model_name, "select_feature": "same", "select_layer": -1}


def config_from_release(
    config_json: Mapping,
    siglip: Optional[Mapping] = None,
    latent_size: int = 48,
    state_shapes: Optional[Mapping[str, tuple[int, ...]]] = None,
    repa: Optional[RepaConfig] = None,
) -> ModelConfig:
    """The official ``config.json`` (as a dict) -> our ``ModelConfig``.

    ``siglip``: the SigLIP table entry of ``vision_und_enc_config.params.model_name`` when it is not
    in ``SIGLIP_TABLE`` (``{name: entry}`` or the entry). ``latent_size``: side of the VAE latent
    (48 for 384 px; config.json does not say). ``state_shapes``: release key -> shape, to read the
    time-embedding width (else it is the encoder width, as released). ``repa``: defaults to
    disabled, since the release has no projector. Settings our modules do not implement raise.
    """
    llm = llm_config_from_hf(config_json["language_config"])
    enc = config_json["vision_gen_enc_config"]["params"]
    dec = config_json["vision_gen_dec_config"]["params"]
    und = config_json["vision_und_enc_config"]["params"]

    _check_supported(enc, dec, und, llm.hidden_size)
    channels = enc["block_out_channels"][0]
    time_key = "vision_gen_enc_model.time_embed.linear_1.weight"
    time_dim = state_shapes[time_key][1] if state_shapes and time_key in state_shapes else channels
    gen = GenerationVisionConfig(
        latent_channels=enc.get("input_channels", 4),
        latent_size=latent_size,
        patch_size=enc["stride"],
        channels=channels,
        num_blocks=enc["layers_in_middle"],
        time_embed_dim=time_dim,
        norm_eps=enc.get("norm_eps", 1e-6),
    )

    und_cfg = siglip_config_from_release(und, siglip)
    # ModelConfig checks the REPA layer even when REPA is off: keep it within the LLM's depth.
    repa = repa or RepaConfig(enabled=False, layer=min(RepaConfig().layer, llm.num_layers))
    return ModelConfig(llm=llm, und_encoder=und_cfg, gen_vision=gen, repa=repa)


def release_config_json(cfg: ModelConfig, siglip_model_name: Optional[str] = None) -> dict:
    """Our ``ModelConfig`` -> an official ``config.json`` dict (inverse of ``config_from_release``).

    The SigLIP tower is named by ``siglip_model_name``, else by the ``SIGLIP_TABLE`` entry matching its
    dimensions (the official code only builds towers of its table).
    """
    g = cfg.gen_vision
    tower = siglip_tower_params(cfg.und_encoder, siglip_model_name)
    common = {
        "block_out_channels": [g.channels], "elementwise_affine": True, "hidden_size": cfg.llm.hidden_size,
        "layers_in_middle": g.num_blocks, "norm_eps": g.norm_eps, "use_bias": True, "use_mid_block": True,
    }
    encoder = {"input_channels": g.latent_channels, "kernel_size": g.patch_size, "stride": g.patch_size,
               "padding": 0}
    decoder = {"in_channels": g.channels, "out_channels": g.latent_channels,
               "upsamples": g.patch_size.bit_length() - 1}
    return {
        "architectures": ["MultiModalityCausalLM"],
        "model_type": "multi_modality",
        "language_config": hf_config_dict(cfg.llm),
        "vision_gen_enc_config": {"cls": "ShallowUViTEncoder", "model_type": "vision_gen_enc",
                                  "params": {**common, **encoder}},
        "vision_gen_dec_config": {"cls": "ShallowUViTDecoder", "model_type": "vision_gen_dec",
                                  "params": {**common, **decoder}},
        "vision_und_enc_config": {"cls": "CLIPVisionTower", "model_type": "vision_und_enc", "params": tower},
    }


# ---------------------------------------------------------------------------------------------
# SigLIP timm <-> HF
_BLOCK_RENAMES = (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.proj", "self_attn.out_proj"),
                  ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))
_TOWER_RENAMES = (("patch_embed.proj", "embeddings.patch_embedding"), ("norm", "post_layernorm"))


def siglip_timm_to_hf(timm: Mapping[str, torch.Tensor], num_layers: int) -> StateDict:
    out: StateDict = {"embeddings.position_embedding.weight": timm["pos_embed"][0]}
    for src, dst in _TOWER_RENAMES:
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = timm[f"{src}.{p}"]
    for n in range(num_layers):
        s, d = f"blocks.{n}.", f"encoder.layers.{n}."
        for src, dst in _BLOCK_RENAMES:
            for p in ("weight", "bias"):
                out[f"{d}{dst}.{p}"] = timm[f"{s}{src}.{p}"]
        for p in ("weight", "bias"):
            for name, part in zip("qkv", timm[f"{s}attn.qkv.{p}"].chunk(3)):
                out[f"{d}self_attn.{name}_proj.{p}"] = part
    return out


def siglip_hf_to_timm(hf: Mapping[str, torch.Tensor], num_layers: int) -> StateDict:
    out: StateDict = {"pos_embed": hf["embeddings.position_embedding.weight"][None]}
    for src, dst in _TOWER_RENAMES:
        for p in ("weight", "bias"):
            out[f"{src}.{p}"] = hf[f"{dst}.{p}"]
    for n in range(num_layers):
        s, d = f"blocks.{n}.", f"encoder.layers.{n}."
        for src, dst in _BLOCK_RENAMES:
            for p in ("weight", "bias"):
                out[f"{s}{src}.{p}"] = hf[f"{d}{dst}.{p}"]
        for p in ("weight", "bias"):
            out[f"{s}attn.qkv.{p}"] = torch.cat([hf[f"{d}self_attn.{x}_proj.{p}"] for x in "qkv"])
    return out


def attn_pool_shapes(cfg: UnderstandingEncoderConfig, prefix: str = ATTN_POOL) -> dict[str, tuple[int, ...]]:
    """Release keys (under ``prefix``) and shapes of timm's unused attention-pooling head (one latent query)."""
    d, m = cfg.hidden_size, cfg.intermediate_size
    shapes = {
        "latent": (1, 1, d), "q.weight": (d, d), "q.bias": (d,), "kv.weight": (2 * d, d), "kv.bias": (2 * d,),
        "proj.weight": (d, d), "proj.bias": (d,), "norm.weight": (d,), "norm.bias": (d,),
        "mlp.fc1.weight": (m, d), "mlp.fc1.bias": (m,), "mlp.fc2.weight": (d, m), "mlp.fc2.bias": (d,),
    }
    return {prefix + k: s for k, s in shapes.items()}


# ---------------------------------------------------------------------------------------------
# whole states
def rename_key(key: str, pairs) -> Optional[str]:
    for src, dst in pairs:
        if key == src or key.startswith(src + "."):
            return dst + key[len(src):]
    return None


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def layout_to_release(ours: Mapping[str, torch.Tensor], cfg: ModelConfig, siglip_prefix: str = RELEASE_SIGLIP,
                      renames=_RENAMES) -> StateDict:
    """Our names -> a release's (either family: its SigLIP prefix and its whole-module ``renames``,
    (release, ours) pairs). Layout change only (no checks, no attn_pool); works on meta tensors."""
    out = {RELEASE_LLM + k: v for k, v in megatron_to_hf(strip_prefix(ours, LLM_PREFIX), cfg.llm).items()}
    siglip = siglip_hf_to_timm(strip_prefix(ours, OUR_SIGLIP), cfg.und_encoder.num_layers)
    out.update({siglip_prefix + k: v for k, v in siglip.items()})
    back = tuple((dst, src) for src, dst in renames)
    out.update({rename_key(k, back): v for k, v in ours.items() if rename_key(k, back)})
    return out


def layout_from_release(state: Mapping[str, torch.Tensor], cfg: ModelConfig, siglip_prefix: str = RELEASE_SIGLIP,
                        renames=_RENAMES) -> StateDict:
    """Inverse of ``layout_to_release`` (keys it does not map are left out)."""
    out = {LLM_PREFIX + k: v for k, v in hf_to_megatron(strip_prefix(state, RELEASE_LLM), cfg.llm).items()}
    siglip = siglip_timm_to_hf(strip_prefix(state, siglip_prefix), cfg.und_encoder.num_layers)
    out.update({OUR_SIGLIP + k: v for k, v in siglip.items()})
    out.update({rename_key(k, renames): v for k, v in state.items() if rename_key(k, renames)})
    return out


def release_shapes(cfg: ModelConfig, with_attn_pool: bool = True) -> dict[str, tuple[int, ...]]:
    """Release key -> shape for ``cfg`` (computed on meta tensors: nothing is allocated)."""
    meta = {k: torch.empty(s, device="meta") for k, s in full_state_shapes(cfg, include_repa=False).items()}
    shapes = {k: tuple(v.shape) for k, v in layout_to_release(meta, cfg).items()}
    if with_attn_pool:
        shapes.update(attn_pool_shapes(cfg.und_encoder))
    return shapes


def release_to_ours(release_state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> StateDict:
    """A released JanusFlow state -> our full state (no ``repa_projector``: load with
    ``keep_fresh=NOT_RELEASED`` so the projector keeps its fresh initialisation; the loader returns
    those keys). ``attn_pool.*`` is dropped whether present or not."""
    state = {k: v for k, v in release_state.items() if not k.startswith(ATTN_POOL)}
    check_shapes(release_shapes(cfg, with_attn_pool=False), state, "released JanusFlow checkpoint")
    return layout_from_release(state, cfg)


def ours_to_release(
    our_state: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    extras: Optional[Mapping[str, torch.Tensor]] = None,
) -> StateDict:
    """Our full state -> the released layout, loadable strictly by the official code.

    ``repa_projector.*`` is dropped (training only). The SigLIP pooling head ``attn_pool.*``, which
    the official tower builds but never runs, is written from ``extras`` (release key names, e.g.
    kept from the imported checkpoint) when given, else synthesised as zeros of the right shapes
    (dtype of the patch embedding) only so that a strict ``load_state_dict`` succeeds.
    """
    state = {k: v for k, v in our_state.items() if not k.startswith(NOT_RELEASED)}
    check_shapes(full_state_shapes(cfg, include_repa=False), state, "our JanusFlow state")
    out = layout_to_release(state, cfg)
    out.update(attn_pool_tensors(state, cfg.und_encoder, extras, ATTN_POOL))
    return out


def attn_pool_tensors(
    our_state: Mapping[str, torch.Tensor],
    cfg: UnderstandingEncoderConfig,
    extras: Optional[Mapping[str, torch.Tensor]],
    prefix: str,
) -> StateDict:
    """The pooling head to write under ``prefix``: ``extras`` after a shape check, else zeros in the
    dtype of our patch embedding (never run, only there for a strict ``load_state_dict``)."""
    pool_shapes = attn_pool_shapes(cfg, prefix)
    if extras is not None:
        check_shapes(pool_shapes, extras, "extras (the SigLIP attn_pool head)")
        return dict(extras)
    like = our_state[OUR_SIGLIP + "embeddings.patch_embedding.weight"]
    return {k: torch.zeros(s, dtype=like.dtype) for k, s in pool_shapes.items()}


def attn_pool_extras(release_state: Mapping[str, torch.Tensor], prefix: str = ATTN_POOL) -> StateDict:
    """The ``attn_pool.*`` tensors (under ``prefix``) of a released state, to pass back to ``ours_to_release``."""
    return {k: v for k, v in release_state.items() if k.startswith(prefix)}
