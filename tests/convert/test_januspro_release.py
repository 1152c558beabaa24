"""Released Janus-Pro layout <-> ours: config.json both ways, the key map, one error for all bad keys,
family detection in the CLI (the numbers and the bit-exact file round trip: test_januspro_conformance.py).

The VQ-16 part is 72M numbers whatever the config, so these tests carry it as meta tensors (shapes only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain.convert import StateDictError
from pretrain.convert.__main__ import main
from pretrain.convert.januspro import (
    ATTN_POOL, RELEASE_VQ, attn_pool_extras, config_from_release, is_januspro_config, ours_to_release,
    release_config_json, release_model_shapes, release_to_ours, vq_state_from_release,
)
from pretrain.convert.state import full_state_shapes, save_state
from image_codecs.vq16 import vq16_shapes

FIXTURE = Path("/work/shared/conformance/januspro_tiny")
REPO = Path(__file__).resolve().parents[2]


def released_config(hidden: int, layers: int, heads: int, ffn: int, vocab: int = 102400) -> dict:
    """config.json of a released Janus-Pro size (the facts of the issue: DeepSeek-LLM shapes,
    SigLIP-L/16 at 384, VQ-16 with 16,384 8-d codes, heads and aligners at the LLM width)."""
    def projector(kind, input_dim):
        return {"cls": "MlpProjector", "model_type": kind,
                "params": {"depth": 2, "input_dim": input_dim, "n_embed": hidden, "projector_type": "mlp_gelu"}}

    return {
        "architectures": ["MultiModalityCausalLM"], "model_type": "multi_modality",
        "language_config": {"hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
                            "num_attention_heads": heads, "num_key_value_heads": heads, "vocab_size": vocab,
                            "max_position_embeddings": 16384, "model_type": "llama", "torch_dtype": "bfloat16"},
        "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision",
                          "params": {"image_size": 384, "model_name": "siglip_large_patch16_384",
                                     "select_feature": "same", "select_layer": -1}},
        "aligner_config": projector("aligner", 1024),
        "gen_vision_config": {"cls": "VQ-16", "model_type": "gen_vision",
                              "params": {"image_token_size": 16384, "n_embed": 8}},
        "gen_aligner_config": projector("gen_aligner", 8),
        "gen_head_config": {"cls": "vision_head", "model_type": "gen_head",
                            "params": {"image_token_embed": hidden, "image_token_size": 16384, "n_embed": hidden}},
    }


@pytest.mark.parametrize("size", [(2048, 24, 16, 5632), (4096, 30, 32, 11008)], ids=["1B", "7B"])
def test_released_configs_both_ways(size):
    config = released_config(*size)
    assert is_januspro_config(config)
    cfg = config_from_release(config)
    assert cfg.family == "januspro" and not cfg.repa.enabled
    assert (cfg.llm.hidden_size, cfg.llm.num_layers, cfg.llm.num_attention_heads, cfg.llm.ffn_hidden_size) == size
    assert (cfg.und_encoder.num_layers, cfg.und_encoder.hidden_size, cfg.und_encoder.num_image_tokens) == (24, 1024, 576)
    tokens = cfg.image_tokens
    assert (tokens.codebook_size, tokens.embed_dim, tokens.downsample, tokens.head_hidden_size) == (16384, 8, 16, None)
    assert tokens.num_codes(cfg.und_encoder.image_size) == 576  # 24 x 24
    again = release_config_json(cfg)
    assert config_from_release(again) == cfg
    for section in ("vision_config", "aligner_config", "gen_vision_config", "gen_aligner_config", "gen_head_config"):
        assert again[section] == config[section], section


@pytest.mark.skipif(not FIXTURE.exists(), reason="conformance fixture not present")
def test_layout_equals_the_official_key_list():
    meta = json.loads((FIXTURE / "fixture_meta.json").read_text())
    cfg = config_from_release(json.loads((FIXTURE / "config.json").read_text()), meta["siglip_registry_entry"])
    official = {k: tuple(s) for k, s in json.loads((FIXTURE / "keys.json").read_text())}
    ours = release_model_shapes(cfg)
    ours.update({RELEASE_VQ + k: s for k, s in vq16_shapes(cfg.image_tokens.codebook_size).items()})
    assert ours == official
    assert not is_januspro_config({"vision_gen_enc_config": {}})  # JanusFlow's


def meta_release(cfg) -> dict:
    shapes = release_model_shapes(cfg)
    shapes.update({RELEASE_VQ + k: s for k, s in vq16_shapes(cfg.image_tokens.codebook_size).items()})
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


SMALL_SIGLIP = {"siglip_large_patch16_384": dict(image_size=384, patch_size=16, width=32, layers=2, heads=2,
                                                 mlp_ratio=2)}


def small_config():
    config = released_config(64, 2, 4, 128, vocab=512)
    config["aligner_config"]["params"]["input_dim"] = 32  # the small tower's width
    return config_from_release(config, SMALL_SIGLIP)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_release_ours_release_is_bit_exact(dtype):
    cfg = small_config()
    release = meta_release(cfg)
    gen = torch.Generator().manual_seed(0)
    for key in release:  # real numbers for the model, shapes only for the 72M-number VQ
        if not key.startswith(RELEASE_VQ):
            release[key] = torch.randn(release[key].shape, generator=gen).to(dtype)
    ours = release_to_ours(release, cfg)
    assert {k: tuple(v.shape) for k, v in ours.items()} == full_state_shapes(cfg)
    assert not any(k.startswith("gen_vision_model") or "attn_pool" in k for k in ours)
    back = ours_to_release(ours, vq_state_from_release(release), cfg, attn_pool_extras(release))
    assert sorted(back) == sorted(release)
    for key, value in release.items():
        if key.startswith(RELEASE_VQ):
            assert back[key] is value  # passed through untouched
        else:
            assert back[key].dtype == dtype and torch.equal(back[key], value), key
    zeros = ours_to_release(ours, vq_state_from_release(release), cfg)  # no extras: a zero pooling head
    assert all(zeros[k].count_nonzero() == 0 for k in zeros if k.startswith(ATTN_POOL))


def test_bad_release_checkpoint_lists_every_problem():
    cfg = small_config()
    release = meta_release(cfg)
    del release["gen_head.vision_head.bias"]
    del release[RELEASE_VQ + "quantize.codebook_used"]
    release["gen_embed.weight"] = torch.empty(16384, 4, device="meta")
    release["gen_extra.weight"] = torch.empty(1, device="meta")
    with pytest.raises(StateDictError) as err:
        release_to_ours(release, cfg)
    e = err.value
    assert sorted(k for k, _ in e.missing) == ["gen_head.vision_head.bias", "gen_vision_model.quantize.codebook_used"]
    assert [k for k, _ in e.unexpected] == ["gen_extra.weight"]
    assert [(k, g) for k, _, g in e.mismatched] == [("gen_embed.weight", (16384, 4))]


def test_unsupported_configuration_names_every_setting():
    config = released_config(64, 2, 4, 128)
    config["aligner_config"]["params"]["projector_type"] = "linear"
    config["gen_head_config"]["params"]["image_token_size"] = 1000
    with pytest.raises(ValueError) as err:
        config_from_release(config)
    assert "mlp_gelu" in str(err.value) and "image_token_size" in str(err.value)
    config = released_config(64, 2, 4, 128)
    config["gen_vision_config"]["cls"] = "VQ-8"
    with pytest.raises(ValueError, match="only the VQ-16"):
        config_from_release(config)
    del config["gen_head_config"]
    assert not is_januspro_config(config)


def test_cli_export_needs_the_vq_and_a_released_codec(tmp_path, capsys):
    cfg = small_config()
    state = save_state({k: torch.zeros(s) for k, s in full_state_shapes(cfg).items()}, tmp_path / "ours.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(release_config_json(cfg, "siglip_large_patch16_384")))
    siglip = tmp_path / "siglip.json"
    siglip.write_text(json.dumps(SMALL_SIGLIP))
    args = ["export-release", "--state", str(state), "--siglip", str(siglip), "--out", str(tmp_path / "out")]
    assert main(args + ["--config", str(tmp_path / "config.json")]) == 1
    assert "vq16.safetensors: the VQ-16 weights are needed" in capsys.readouterr().err
    # a recipe whose codes come from the k-means patch codec has no released layout
    assert main(args + ["--config", str(REPO / "recipes" / "tiny_januspro_cpu.yaml")]) == 1
    assert "no released layout" in capsys.readouterr().err
