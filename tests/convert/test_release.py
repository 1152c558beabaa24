"""Released JanusFlow layout <-> ours: bit-exact round trips, one error for all bad keys, safetensors only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain.convert import StateDictError
from pretrain.convert.__main__ import main
from pretrain.convert.release import (
    ATTN_POOL, NOT_RELEASED, attn_pool_extras, attn_pool_shapes, config_from_release, ours_to_release,
    release_config_json, release_shapes, release_to_ours,
)
from pretrain.convert.state import (
    UnsafeCheckpointError, full_model_state, full_state_shapes, load_model_state, load_state, save_state,
)
from pretrain.model.config import ModelConfig, RepaConfig
from pretrain.model.janusflow import JanusFlowModel
from tests.conftest import one_error

FIXTURE = Path("/work/shared/conformance/janusflow_tiny")
# the SigLIP table entry of the tiny test tower, as the official table writes one
SIGLIP = {"siglip_test": dict(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2)}


@pytest.fixture
def tiny(runtime, tiny_model_config):
    """(cfg, model, full state) of a tiny random model with a REPA projector."""
    cfg = tiny_model_config()
    torch.manual_seed(0)
    model = JanusFlowModel(cfg)
    with torch.no_grad():  # no parameter left at a constant init, so a swap would show
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return cfg, model, {k: v.clone() for k, v in full_model_state(model).items()}


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_full_state_shapes_match_the_model(tiny):
    cfg, _, full = tiny
    assert full_state_shapes(cfg) == {k: tuple(v.shape) for k, v in full.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_then_import_is_bit_exact(tiny, tmp_path, dtype):
    cfg, _, full = tiny
    full = {k: v.to(dtype) for k, v in full.items()}
    release = ours_to_release(full, cfg)
    assert not any(k.startswith("repa_projector") for k in release)
    assert {k: tuple(v.shape) for k, v in release.items()} == release_shapes(cfg)
    pool = [release[k] for k in attn_pool_shapes(cfg.und_encoder)]
    assert all(torch.count_nonzero(t) == 0 and t.dtype == dtype for t in pool)

    path = save_state(release, tmp_path / "release" / "model.safetensors")
    back = release_to_ours(load_state(path.parent), cfg)
    assert_same(back, {k: v for k, v in full.items() if not k.startswith(NOT_RELEASED)})

    # the attn_pool head given back on export is written as it is
    extras = {k: torch.randn(s).to(dtype) for k, s in attn_pool_shapes(cfg.und_encoder).items()}
    again = ours_to_release(back, cfg, extras)
    assert_same(attn_pool_extras(again), extras)


def test_imported_state_loads_strictly_and_keeps_repa_fresh(tiny):
    cfg, _, full = tiny
    ours = release_to_ours(ours_to_release(full, cfg), cfg)
    torch.manual_seed(1)
    fresh_model = JanusFlowModel(cfg)
    fresh = full_model_state(fresh_model)
    fresh_repa = {k: v.clone() for k, v in fresh.items() if k.startswith(NOT_RELEASED)}
    kept = load_model_state(fresh_model, ours, keep_fresh=NOT_RELEASED)
    assert kept == sorted(fresh_repa)
    loaded = full_model_state(fresh_model)
    assert_same({k: v for k, v in loaded.items() if k not in fresh_repa}, ours)
    assert_same({k: loaded[k] for k in fresh_repa}, fresh_repa)
    with pytest.raises(StateDictError, match="missing     repa_projector.net.0.weight"):
        load_model_state(fresh_model, ours)  # without keep_fresh the projector is required


def test_bad_release_checkpoint_lists_every_problem(tiny):
    cfg, _, full = tiny
    release = ours_to_release(full, cfg)
    del release["language_model.model.layers.1.mlp.up_proj.weight"]
    del release["vision_gen_dec_model.out_convs.0.norm.weight"]
    release["vision_und_enc_model.vision_tower.pos_embed"] = torch.zeros(1, 15, 32)
    with pytest.raises(StateDictError) as info:
        release_to_ours(release, cfg)
    err = info.value
    assert sorted(k for k, _ in err.missing) == [
        "language_model.model.layers.1.mlp.up_proj.weight", "vision_gen_dec_model.out_convs.0.norm.weight",
    ]
    assert err.mismatched == [("vision_und_enc_model.vision_tower.pos_embed", (1, 16, 32), (1, 15, 32))]
    assert err.unexpected == []
    message = str(err)
    for key in ("up_proj", "out_convs.0.norm.weight", "pos_embed"):
        assert key in message


def test_bad_full_state_is_refused_before_any_copy(tiny):
    cfg, model, full = tiny
    bad = dict(full)
    del bad["llm.decoder.layers.0.mlp.linear_fc2.weight"]
    bad["llm.output_layer.weight"] = torch.zeros(3, 3)
    bad["gen_decoder.extra.weight"] = torch.zeros(2)
    before = {k: v.clone() for k, v in full_model_state(model).items()}
    with pytest.raises(StateDictError) as info:
        load_model_state(model, {k: v + 1 for k, v in bad.items()})
    err = info.value
    assert (len(err.missing), len(err.unexpected), len(err.mismatched)) == (1, 1, 1)
    assert_same(full_model_state(model), before)


def test_config_json_round_trip(tiny_model_config):
    cfg = tiny_model_config(repa=RepaConfig(enabled=False, layer=2))
    config_json = release_config_json(cfg, "siglip_test")
    assert config_from_release(config_json, SIGLIP, latent_size=8) == cfg
    assert config_from_release(config_json, SIGLIP["siglip_test"], latent_size=8) == cfg
    # The way out is named: the small towers' entries travel in siglip_entry.json beside an export.
    with pytest.raises(ValueError, match="not in the SigLIP table .* with --siglip, e.g. the siglip_entry.json"):
        config_from_release(config_json, latent_size=8)
    # the released 1.3B: SigLIP-L/16-384 comes from the built-in table, both ways
    released = config_from_release(release_config_json(ModelConfig()))
    default = ModelConfig()
    assert (released.llm, released.und_encoder, released.gen_vision) == (
        default.llm, default.und_encoder, default.gen_vision
    )


@pytest.mark.skipif(not FIXTURE.exists(), reason="conformance fixture not present")
def test_release_layout_equals_the_official_key_list():
    meta = json.loads((FIXTURE / "fixture_meta.json").read_text())
    config = json.loads((FIXTURE / "config.json").read_text())
    cfg = config_from_release(config, meta["siglip_registry_entry"], latent_size=8)
    official = {k: tuple(s) for k, s in json.loads((FIXTURE / "keys.json").read_text())}
    assert release_shapes(cfg) == official
    assert any(k.startswith(ATTN_POOL) for k in official)


def test_import_refuses_pickled_checkpoints(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    (tmp_path / "config.json").write_text("{}")
    for path in (tmp_path, tmp_path / "pytorch_model.bin", tmp_path / "model.pt"):
        with pytest.raises(UnsafeCheckpointError, match="only .safetensors"):
            load_state(path)
    out = tmp_path / "o.safetensors"
    assert main(["import-release", "--checkpoint", str(tmp_path), "--out", str(out)]) == 1
    assert not out.exists()


def test_cli_export_then_import(tiny, tmp_path, capsys):
    cfg, _, full = tiny
    state = save_state(full, tmp_path / "ours.safetensors")
    config = tmp_path / "release_config.json"
    config.write_text(json.dumps(release_config_json(cfg, "siglip_test")))
    siglip = tmp_path / "siglip.json"
    siglip.write_text(json.dumps(SIGLIP))
    common = ["--siglip", str(siglip), "--latent-size", "8"]
    rel, out = tmp_path / "rel", tmp_path / "back.safetensors"
    export = ["export-release", "--state", str(state), "--config", str(config), "--out", str(rel)]
    assert main(export + common) == 0
    assert json.loads((rel / "config.json").read_text()) == json.loads(config.read_text())
    assert main(["import-release", "--checkpoint", str(rel), "--out", str(out)] + common) == 0
    assert "repa_projector" in capsys.readouterr().out
    assert_same(load_state(out), {k: v for k, v in full.items() if not k.startswith(NOT_RELEASED)})


def test_cli_export_refuses_a_state_holding_nan(tiny, tmp_path, capsys):
    # Before: exported with exit 0, a release whose every sample would be NaN.
    cfg, _, full = tiny
    key = next(k for k in full if k.startswith("gen_decoder."))
    state = save_state({**full, key: torch.full_like(full[key], float("nan"))}, tmp_path / "ours.safetensors")
    config = tmp_path / "release_config.json"
    config.write_text(json.dumps(release_config_json(cfg, "siglip_test")))
    siglip = tmp_path / "siglip.json"
    siglip.write_text(json.dumps(SIGLIP))
    rel = tmp_path / "rel"
    assert main(["export-release", "--state", str(state), "--config", str(config), "--out", str(rel),
                 "--siglip", str(siglip), "--latent-size", "8"]) == 1
    assert one_error(capsys).startswith(f"error: {state}: tensor {key!r} holds NaN or inf values")
    assert not (rel / "model.safetensors").exists()
