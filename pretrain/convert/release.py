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

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

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
SIGLIP_KEYS = ("image_size", "patch_size", "width", "layers", "heads", "mlp_ratio")
DEFAULT_LATENT_SIZE = 48  # the SDXL-VAE latent of the released 384 px models; config.json does not say
# The release format has no field for how the flow's latents become pixels: the official pipeline
# always decodes them with the SDXL VAE (scale 0.13025). A model of ours trained on the pixel-space
# latent (``space_to_depth``) or with another ``latent_scale`` would come back from the release
# format as SDXL-VAE latents of --latent-size: black or noise images, exit 0, not a word. So
# ``release_config_json`` writes the flow's latent settings under this non-standard top-level key
# for such models only (a true SDXL-VAE export is unchanged), and ``config_from_release`` reads it
# back. The official ``MultiModalityConfig`` keeps unknown keys as plain attributes and ignores
# them. (Refusing such models instead would break ``python -m pretrain.export``'s release format
# for the CPU recipes, whose round trip is tested; the official code cannot decode them either way.)
LATENT_KEY = "janusflow_pretrain_latent"


# ---------------------------------------------------------------------------------------------
# JSON files (config.json, the SigLIP entry): every problem names the file
def json_type(value: Any) -> str:
    """How a JSON value's kind reads in a message."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}
    return next((n for t, n in names.items() if isinstance(value, t)), f"the number {value!r}")


# The configs read here are a few KiB; an HF index of the largest checkpoints is a few MiB.
MAX_JSON_BYTES = 16 << 20


def read_json_file(path: str | Path) -> Any:
    """The parsed contents of a JSON file; missing, a folder or malformed raises one error naming it."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: a folder, not a JSON file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.stat().st_size > MAX_JSON_BYTES:  # read whole, a wrong file (a checkpoint) would fill the memory
        raise ValueError(f"{path}: {path.stat().st_size >> 20} MiB, larger than a config file can be "
                         f"({MAX_JSON_BYTES >> 20} MiB); give the model's config.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a JSON text file (not UTF-8)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    except RecursionError:  # json's parser recurses per nesting level
        raise ValueError(f"{path}: not a config file (JSON nested too deeply)") from None


@contextmanager
def errors_naming(path: str | Path) -> Iterator[None]:
    """Turn what reading a parsed JSON file's contents raises into one ``ValueError`` naming the file.

    A JSON file that parses but has another shape than expected (``[]``, a string where an object
    belongs, a section without its ``params``) fails deep in the converters with KeyError,
    TypeError or AttributeError; the user needs the file and what is wrong, not a traceback.
    """
    try:
        yield
    except KeyError as err:
        raise ValueError(f"{path}: missing key {err.args[0]!r}") from None
    except (TypeError, AttributeError, IndexError, ZeroDivisionError) as err:
        raise ValueError(f"{path}: not the expected layout ({err})") from None
    except ValueError as err:
        if str(err).startswith(str(path)):
            raise
        raise ValueError(f"{path}: {err}") from None


def check_siglip_entry(entry: Any, where: str) -> Mapping:
    """``entry`` if it is a SigLIP table entry (``SIGLIP_KEYS``, positive numbers), else a
    ``ValueError`` naming ``where`` and the missing or wrong key."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: expected a SigLIP entry (an object with {', '.join(SIGLIP_KEYS)}), "
                         f"got {json_type(entry)}")
    missing = [k for k in SIGLIP_KEYS if k not in entry]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(map(repr, missing))} (a SigLIP entry has "
                         f"{', '.join(SIGLIP_KEYS)})")
    for key in SIGLIP_KEYS:
        value, kind = entry[key], (float, int) if key == "mlp_ratio" else int
        if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
            need = "a positive number" if key == "mlp_ratio" else "a positive integer"
            raise ValueError(f"{where}: {key} must be {need}, got {json.dumps(value)}")
    return entry


def read_siglip_file(path: str | Path) -> dict:
    """A ``--siglip`` file: one SigLIP table entry, or ``{model_name: entry, ...}`` as in the official
    table; every entry is checked here, so a wrong file is named before any weight is read."""
    data = read_json_file(path)
    if not isinstance(data, Mapping) or not data:
        raise ValueError(f"{path}: expected a SigLIP entry ({', '.join(SIGLIP_KEYS)}) or {{model_name: entry}}, "
                         f"got {json_type(data) if data != {} else 'an empty object'}")
    if any(k in data for k in SIGLIP_KEYS):  # the entry itself
        check_siglip_entry(data, str(path))
    else:
        for name, entry in data.items():
            check_siglip_entry(entry, f"{path}: {name}")
    return dict(data)


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
def _siglip_entry(name: str, siglip: Optional[Mapping]) -> Mapping:
    if siglip is not None:
        if not isinstance(siglip, Mapping):
            raise ValueError(f"siglip: expected a SigLIP entry or {{name: entry}}, got {json_type(siglip)}")
        entry = siglip.get(name, siglip)  # {name: entry} as in the official table, or the entry itself
        if not isinstance(entry, Mapping) or "width" not in entry:
            raise ValueError(f"siglip: no entry for {name!r} (keys: {sorted(siglip)})")
        return check_siglip_entry(entry, f"siglip entry {name!r}")
    if name not in SIGLIP_TABLE:
        raise ValueError(
            f"SigLIP tower model_name={name!r} (config.json, vision tower params) is not in the SigLIP table "
            f"({sorted(SIGLIP_TABLE)}): pass its entry (image_size, patch_size, width, layers, heads, mlp_ratio) "
            "with --siglip, e.g. the siglip_entry.json that pretrain.export writes beside config.json"
        )
    return SIGLIP_TABLE[name]


def _object(value: Any, where: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {json_type(value)}")
    return value


def section_params(config_json: Mapping, section: str) -> Mapping:
    """``config_json[section]["params"]``, or an error naming the missing or wrong key."""
    if section not in config_json:
        raise ValueError(f"missing key {section!r}")
    params = _object(config_json[section], section).get("params")
    if params is None:
        raise ValueError(f"missing key '{section}.params'")
    return _object(params, f"{section}.params")


# What each numeric field config.json may hold: "count" (an integer >= 1), "size" (>= 0), "int",
# "number", "text"; "?" = also null. Absent fields take defaults; a present one of the wrong kind
# would otherwise fail as a TypeError deep in the converters.
_LANGUAGE_FIELDS = {
    "vocab_size": "count", "hidden_size": "count", "intermediate_size": "count", "num_hidden_layers": "count",
    "num_attention_heads": "count", "num_key_value_heads": "count?", "head_dim": "count?",
    "rms_norm_eps": "number", "rope_theta": "number",
}
_GEN_FIELDS = {
    "input_channels": "count", "kernel_size": "count", "stride": "count", "padding": "size",
    "layers_in_middle": "count", "hidden_size": "count", "in_channels": "count", "out_channels": "count",
    "upsamples": "size", "norm_eps": "number",
}
_UND_FIELDS = {"model_name": "text", "image_size": "count", "select_layer": "int"}


def _field_ok(value: Any, kind: str) -> bool:
    if kind == "text":
        return isinstance(value, str)
    if isinstance(value, bool) or not isinstance(value, (int, float)):  # JSON true is a Python int
        return False
    if kind == "number":
        return True
    return isinstance(value, int) and {"count": value >= 1, "size": value >= 0, "int": True}[kind]


def _check_fields(values: Mapping, where: str, kinds: Mapping[str, str]) -> None:
    for key, kind in kinds.items():
        if key not in values or (kind.endswith("?") and values[key] is None):
            continue
        kind = kind.rstrip("?")
        if not _field_ok(values[key], kind):
            need = {"count": "an integer >= 1", "size": "an integer >= 0", "int": "an integer",
                    "number": "a number", "text": "a string"}[kind]
            raise ValueError(f"{where}.{key} must be {need}, got {json.dumps(values[key])}")


def check_language_config(config_json: Any) -> None:
    """The part of an official config.json both families read: an object whose ``language_config``
    (an HF Llama config) holds numbers where numbers belong."""
    if not isinstance(config_json, Mapping):
        raise ValueError(f"expected a JSON object (an official config.json), got {json_type(config_json)}")
    if "language_config" not in config_json:
        raise ValueError("missing key 'language_config' (is this a JanusFlow or Janus-Pro config.json?)")
    _check_fields(_object(config_json["language_config"], "language_config"), "language_config", _LANGUAGE_FIELDS)


def _check_supported(enc: Mapping, dec: Mapping, und: Mapping, llm_hidden: int) -> None:
    """Raise one error naming every released setting our modules do not implement."""
    absent = [k for k in ("stride", "kernel_size", "block_out_channels", "layers_in_middle") if k not in enc]
    if absent:
        # The encoder's class defaults (kernel 7, stride 4) are not the released setting: never guess.
        raise ValueError(f"vision_gen_enc_config.params lacks {absent}")
    for params, where in ((enc, "vision_gen_enc_config.params"), (dec, "vision_gen_dec_config.params")):
        _check_fields(params, where, _GEN_FIELDS)
        channels = params.get("block_out_channels", [1])
        if not isinstance(channels, list) or not channels or not all(
                isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels):
            raise ValueError(f"{where}.block_out_channels must be a list of integers >= 1, got {json.dumps(channels)}")
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
    _check_fields(und, "vision tower params", _UND_FIELDS)
    if "model_name" not in und:
        raise ValueError("missing key 'model_name' in the vision tower params")
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


def _stored_latent(config_json: Mapping, latent_size: Optional[int]) -> dict:
    """``GenerationVisionConfig`` fields for the latent: from ``LATENT_KEY`` when config.json has it
    (our export of a non-SDXL-VAE model), else ``latent_size`` (default 48) and the SDXL-VAE codec."""
    if LATENT_KEY not in config_json:
        return {"latent_size": DEFAULT_LATENT_SIZE if latent_size is None else latent_size}
    stored = _object(config_json[LATENT_KEY], LATENT_KEY)
    missing = [k for k in ("latent_codec", "latent_scale", "latent_size") if k not in stored]
    if missing:
        raise ValueError(f"{LATENT_KEY}: missing {', '.join(map(repr, missing))}")
    _check_fields(stored, LATENT_KEY, {"latent_size": "count", "latent_scale": "number", "latent_codec": "text"})
    if stored["latent_scale"] <= 0:  # decoding divides by it
        raise ValueError(f"{LATENT_KEY}.latent_scale must be positive, got {stored['latent_scale']}")
    if latent_size is not None and latent_size != stored["latent_size"]:
        raise ValueError(f"{LATENT_KEY}.latent_size is {stored['latent_size']} but latent size {latent_size} "
                         "was asked for (--latent-size): leave --latent-size out")
    return {k: stored[k] for k in ("latent_codec", "latent_scale", "latent_size")}


def config_from_release(
    config_json: Mapping,
    siglip: Optional[Mapping] = None,
    latent_size: Optional[int] = None,
    state_shapes: Optional[Mapping[str, tuple[int, ...]]] = None,
    repa: Optional[RepaConfig] = None,
) -> ModelConfig:
    """The official ``config.json`` (as a dict) -> our ``ModelConfig``.

    ``siglip``: the SigLIP table entry of ``vision_und_enc_config.params.model_name`` when it is not
    in ``SIGLIP_TABLE`` (``{name: entry}`` or the entry). ``latent_size``: side of the VAE latent
    (default 48, for 384 px; config.json does not say unless our export wrote ``LATENT_KEY``, which
    then gives it). ``state_shapes``: release key -> shape, to read the time-embedding width (else
    it is the encoder width, as released). ``repa``: defaults to disabled, since the release has no
    projector. Settings our modules do not implement, and a config.json of another layout, raise
    ``ValueError`` naming the key.
    """
    check_language_config(config_json)
    llm = llm_config_from_hf(config_json["language_config"])
    enc = section_params(config_json, "vision_gen_enc_config")
    dec = section_params(config_json, "vision_gen_dec_config")
    und = section_params(config_json, "vision_und_enc_config")

    _check_supported(enc, dec, und, llm.hidden_size)
    channels = enc["block_out_channels"][0]
    time_key = "vision_gen_enc_model.time_embed.linear_1.weight"
    time_dim = state_shapes[time_key][1] if state_shapes and time_key in state_shapes else channels
    gen = GenerationVisionConfig(
        **_stored_latent(config_json, latent_size),
        latent_channels=enc.get("input_channels", 4),
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
    dimensions (the official code only builds towers of its table). A latent other than the
    release's SDXL VAE is written under ``LATENT_KEY`` (see there why).
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
    config = {
        "architectures": ["MultiModalityCausalLM"],
        "model_type": "multi_modality",
        "language_config": hf_config_dict(cfg.llm),
        "vision_gen_enc_config": {"cls": "ShallowUViTEncoder", "model_type": "vision_gen_enc",
                                  "params": {**common, **encoder}},
        "vision_gen_dec_config": {"cls": "ShallowUViTDecoder", "model_type": "vision_gen_dec",
                                  "params": {**common, **decoder}},
        "vision_und_enc_config": {"cls": "CLIPVisionTower", "model_type": "vision_und_enc", "params": tower},
    }
    released = GenerationVisionConfig()
    if (g.latent_codec, g.latent_scale) != (released.latent_codec, released.latent_scale):
        config[LATENT_KEY] = {"latent_codec": g.latent_codec, "latent_scale": g.latent_scale,
                              "latent_size": g.latent_size}
    return config


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
