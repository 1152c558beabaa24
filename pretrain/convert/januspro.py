"""The released Janus-Pro checkpoint layout (DeepSeek's ``MultiModalityCausalLM``) <-> ours + VQ-16.

Release prefix                         ours
``language_model.*`` (HF Llama)        ``llm.*`` (megatron, via ``llama.hf_to_megatron``)
``vision_model.vision_tower``          ``und_encoder.tower`` (timm ViT <-> HF SigLIP, as JanusFlow's)
``aligner.layers.{0,2}``               ``und_aligner.{0,2}``
``gen_embed``                          ``gen_embed``
``gen_aligner.layers.{0,2}``           ``gen_aligner.{0,2}``
``gen_head.output_mlp_projector``      ``gen_head.0``
``gen_head.vision_head``               ``gen_head.2``
``gen_vision_model.*``                 the VQ-16 tokenizer (``image_codecs.vq16``, same sub-names): not
                                       part of the trained model, kept in its own state (a file next
                                       to ours, ``vq16.safetensors``)

The SigLIP pooling head ``attn_pool.*`` (built, never run) is dropped on import and written back from
``extras`` (or as zeros) on export, as for JanusFlow. config.json: ``language_config`` (Llama),
``vision_config`` (the SigLIP tower), ``aligner_config`` / ``gen_aligner_config`` (MlpProjector
mlp_gelu of depth 2), ``gen_head_config`` (``vision_head``) and ``gen_vision_config`` (the VQ class:
its sizes are fixed by the code; the codebook size is read from the weights). Every conversion checks
the whole input first and raises one ``StateDictError``; tensors keep their dtype.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from ..model.config import ImageTokenConfig, ModelConfig, RepaConfig
from . import check_shapes
from .llama import hf_config_dict, llm_config_from_hf
from .release import (
    attn_pool_extras as release_attn_pool_extras,
    attn_pool_shapes,
    attn_pool_tensors,
    layout_from_release,
    layout_to_release,
    siglip_config_from_release,
    siglip_tower_params,
    strip_prefix,
)
from .state import full_state_shapes

StateDict = dict[str, torch.Tensor]

RELEASE_SIGLIP = "vision_model.vision_tower."
ATTN_POOL = RELEASE_SIGLIP + "attn_pool."
RELEASE_VQ = "gen_vision_model."
VQ_FILE = "vq16.safetensors"  # the VQ state written next to our converted state
_RENAMES = (  # (release, ours), whole module names
    ("aligner.layers.0", "und_aligner.0"),
    ("aligner.layers.2", "und_aligner.2"),
    ("gen_embed", "gen_embed"),
    ("gen_aligner.layers.0", "gen_aligner.0"),
    ("gen_aligner.layers.2", "gen_aligner.2"),
    ("gen_head.output_mlp_projector", "gen_head.0"),
    ("gen_head.vision_head", "gen_head.2"),
)
_VQ_CLASSES = {"VQ-16": 16}  # the released ``VQ_models`` entry -> pixels per code


def is_januspro_config(config_json: Mapping) -> bool:
    """Whether an official config.json describes Janus-Pro (its image head and code embedding)
    rather than JanusFlow (``vision_gen_enc_config``: the rectified-flow encoder)."""
    return "gen_head_config" in config_json


def _vq_downsample(cls: str) -> int:
    # A run-time table entry such as the fixture's "VQ-16-codebook64" is VQ_16 with another codebook.
    for name, downsample in _VQ_CLASSES.items():
        if cls == name or cls.startswith(name + "-"):
            return downsample
    raise ValueError(f"gen_vision_config.cls={cls!r}: only the VQ-16 tokenizer is supported ({sorted(_VQ_CLASSES)})")


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
def config_from_release(config_json: Mapping, siglip: Optional[Mapping] = None) -> ModelConfig:
    """The official Janus-Pro ``config.json`` (as a dict) -> our ``ModelConfig(family="januspro")``.

    ``siglip``: the SigLIP table entry of ``vision_config.params.model_name`` when it is not in
    ``release.SIGLIP_TABLE`` (``{name: entry}`` or the entry). Settings our modules do not implement
    are all named in one error.
    """
    missing = [k for k in ("language_config", "vision_config", "aligner_config", "gen_vision_config",
                           "gen_aligner_config", "gen_head_config") if k not in config_json]
    if missing:
        raise ValueError(f"Janus-Pro config.json lacks {missing}")
    llm = llm_config_from_hf(config_json["language_config"])
    und = config_json["vision_config"]["params"]
    aligner, gen_aligner = (config_json[k]["params"] for k in ("aligner_config", "gen_aligner_config"))
    head, vq = config_json["gen_head_config"]["params"], config_json["gen_vision_config"]["params"]
    und_cfg = siglip_config_from_release(und, siglip)
    hidden = llm.hidden_size
    checks = {
        "aligner and gen_aligner: projector_type 'mlp_gelu' of depth 2": all(
            p.get("projector_type") == "mlp_gelu" and p.get("depth") == 2 for p in (aligner, gen_aligner)),
        "aligner input_dim == the SigLIP width": aligner.get("input_dim") == und_cfg.hidden_size,
        "gen_aligner input_dim == gen_vision n_embed": gen_aligner.get("input_dim") == vq.get("n_embed"),
        "aligner, gen_aligner and gen_head n_embed == LLM hidden_size":
            aligner.get("n_embed") == gen_aligner.get("n_embed") == head.get("n_embed") == hidden,
        "gen_head image_token_size == gen_vision image_token_size":
            head.get("image_token_size") == vq.get("image_token_size"),
        "vision_config select_feature 'same'": und.get("select_feature", "patch") == "same",
    }
    problems = [name for name, ok in checks.items() if not ok]
    if problems:
        raise ValueError("unsupported released Janus-Pro configuration, expected: " + "; ".join(problems))
    head_hidden = head["image_token_embed"]
    tokens = ImageTokenConfig(
        codebook_size=head["image_token_size"],
        embed_dim=vq["n_embed"],
        downsample=_vq_downsample(config_json["gen_vision_config"].get("cls", "")),
        head_hidden_size=None if head_hidden == hidden else head_hidden,
        codec="vq16",
    )
    # gen_vision and repa describe JanusFlow's flow head: unused here, REPA off (nothing to train it)
    return ModelConfig(family="januspro", llm=llm, und_encoder=und_cfg, image_tokens=tokens,
                       repa=RepaConfig(enabled=False))


def release_config_json(cfg: ModelConfig, siglip_model_name: Optional[str] = None) -> dict:
    """Our ``ModelConfig`` -> an official Janus-Pro ``config.json`` dict (inverse of
    ``config_from_release``); the tower is named as ``release.siglip_tower_params`` says."""
    hidden, t = cfg.llm.hidden_size, cfg.image_tokens
    if t.codec != "vq16" or t.downsample != 16:
        raise ValueError(f"model.image_tokens: codec {t.codec!r} / downsample {t.downsample} has no released "
                         "layout (only the VQ-16 tokenizer, downsample 16)")

    def projector(kind: str, input_dim: int) -> dict:
        return {"cls": "MlpProjector", "model_type": kind,
                "params": {"depth": 2, "input_dim": input_dim, "n_embed": hidden, "projector_type": "mlp_gelu"}}

    return {
        "architectures": ["MultiModalityCausalLM"],
        "model_type": "multi_modality",
        "language_config": hf_config_dict(cfg.llm),
        "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision",
                          "params": siglip_tower_params(cfg.und_encoder, siglip_model_name)},
        "aligner_config": projector("aligner", cfg.und_encoder.hidden_size),
        "gen_vision_config": {"cls": "VQ-16", "model_type": "gen_vision",
                              "params": {"image_token_size": t.codebook_size, "n_embed": t.embed_dim}},
        "gen_aligner_config": projector("gen_aligner", t.embed_dim),
        "gen_head_config": {"cls": "vision_head", "model_type": "gen_head",
                            "params": {"image_token_embed": t.head_hidden_size or hidden,
                                       "image_token_size": t.codebook_size, "n_embed": hidden}},
    }


# ---------------------------------------------------------------------------------------------
# whole states
def release_model_shapes(cfg: ModelConfig, with_attn_pool: bool = True) -> dict[str, tuple[int, ...]]:
    """Release key -> shape of everything but ``gen_vision_model.*`` (nothing is allocated)."""
    meta = {k: torch.empty(s, device="meta") for k, s in full_state_shapes(cfg).items()}
    shapes = {k: tuple(v.shape) for k, v in layout_to_release(meta, cfg, RELEASE_SIGLIP, _RENAMES).items()}
    if with_attn_pool:
        shapes.update(attn_pool_shapes(cfg.und_encoder, ATTN_POOL))
    return shapes


def _vq_shapes(codebook_size: int) -> dict[str, tuple[int, ...]]:
    from image_codecs.vq16 import vq16_shapes

    return vq16_shapes(codebook_size)


def release_to_ours(release_state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> StateDict:
    """A released Janus-Pro state -> our full state (the VQ-16 part: ``vq_state_from_release``).

    The whole checkpoint is checked, VQ included: its codebook must have
    ``cfg.image_tokens.codebook_size`` rows (the image head predicts its codes). ``attn_pool.*`` is
    dropped whether present or not.
    """
    state = {k: v for k, v in release_state.items() if not k.startswith(ATTN_POOL)}
    expected = release_model_shapes(cfg, with_attn_pool=False)
    expected.update({RELEASE_VQ + k: s for k, s in _vq_shapes(cfg.image_tokens.codebook_size).items()})
    check_shapes(expected, state, "released Janus-Pro checkpoint")
    return layout_from_release(state, cfg, RELEASE_SIGLIP, _RENAMES)


def vq_state_from_release(release_state: Mapping[str, torch.Tensor]) -> StateDict:
    """The VQ-16 tensors of a released Janus-Pro state, without their ``gen_vision_model.`` prefix
    (the layout of ``image_codecs.vq16`` and of the ``vq16.safetensors`` that import writes)."""
    return strip_prefix(release_state, RELEASE_VQ)


def ours_to_release(
    our_state: Mapping[str, torch.Tensor],
    vq_state: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    extras: Optional[Mapping[str, torch.Tensor]] = None,
) -> StateDict:
    """Our full state + the VQ-16 state -> the released layout, loadable strictly by the official code.

    ``extras``: the SigLIP ``attn_pool.*`` tensors (release names, ``attn_pool_extras`` of the
    imported checkpoint); without them, zeros of the right shapes (dtype of the patch embedding),
    only so that a strict ``load_state_dict`` succeeds: the official tower never runs that head.
    """
    check_shapes(full_state_shapes(cfg), our_state, "our Janus-Pro state")
    check_shapes(_vq_shapes(cfg.image_tokens.codebook_size), vq_state, "VQ-16 state")
    out = layout_to_release(our_state, cfg, RELEASE_SIGLIP, _RENAMES)
    out.update({RELEASE_VQ + k: v for k, v in vq_state.items()})
    out.update(attn_pool_tensors(our_state, cfg.und_encoder, extras, ATTN_POOL))
    return out


def attn_pool_extras(release_state: Mapping[str, torch.Tensor]) -> StateDict:
    """The ``attn_pool.*`` tensors of a released Janus-Pro state, to pass back to ``ours_to_release``."""
    return release_attn_pool_extras(release_state, ATTN_POOL)
