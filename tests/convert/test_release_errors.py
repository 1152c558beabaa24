"""``python -m pretrain.convert import-release`` on bad input: one ``error:`` line naming the file or
option, exit 1, no traceback, nothing written; and the pixel-space latent through the release format.

The released checkpoints here are random tensors of the right shapes (``release_shapes``): no model
is built, so each case takes milliseconds.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from pretrain.convert.__main__ import main
from pretrain.convert.release import (
    LATENT_KEY, config_from_release, read_siglip_file, release_config_json, release_shapes,
)
from pretrain.convert.state import read_metadata, save_state
from pretrain.model.config import GenerationVisionConfig, RepaConfig
from tests.conftest import one_error

SIGLIP = {"siglip_test": dict(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2)}


def released(folder, cfg) -> None:
    """A released checkpoint of ``cfg`` (random weights) and its config.json in ``folder``."""
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=gen) for k, s in release_shapes(cfg).items()}
    save_state(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(release_config_json(cfg, "siglip_test")))


@pytest.fixture(scope="module")
def release(tmp_path_factory, tiny_model_config_factory):
    root = tmp_path_factory.mktemp("release")
    released(root, tiny_model_config_factory(repa=RepaConfig(enabled=False, layer=2)))
    (root / "siglip.json").write_text(json.dumps(SIGLIP))
    return root


@pytest.fixture(scope="module")
def tiny_model_config_factory():
    from tests.conftest import _tiny_model_config

    return _tiny_model_config


def import_args(checkpoint, out, siglip):
    return ["import-release", "--checkpoint", str(checkpoint), "--out", str(out), "--siglip", str(siglip),
            "--latent-size", "8"]


def test_the_fixture_imports(release, tmp_path):
    out = tmp_path / "ours.safetensors"
    assert main(import_args(release, out, release / "siglip.json")) == 0
    assert json.loads(read_metadata(out)["model_config"])["gen_vision"]["latent_codec"] == "sdxl_vae"


@pytest.mark.parametrize("damage", ["empty", "truncated", "not safetensors"])
def test_damaged_release_is_named(release, tmp_path, capsys, damage):
    # Before: a SafetensorError traceback.
    folder = tmp_path / "release"
    shutil.copytree(release, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"empty": b"", "truncated": data[: len(data) // 3], "not safetensors": b"\x00" * 64}[damage])
    out = tmp_path / "ours.safetensors"
    assert main(import_args(folder, out, folder / "siglip.json")) == 1
    line = one_error(capsys)
    assert f"error: {weights}: unreadable (truncated or damaged" in line and "re-export or re-download it" in line
    assert not out.exists()


def test_missing_inputs_say_what_is_missing(release, tmp_path, capsys):
    out = tmp_path / "ours.safetensors"
    cases = [
        (import_args(tmp_path / "none.safetensors", out, release / "siglip.json"),
         f"error: {tmp_path / 'none.safetensors'}: no such file or folder"),
        (import_args(release, out, release / "siglip.json") + ["--config", str(tmp_path / "nonexist.json")],
         f"error: --config {tmp_path / 'nonexist.json'}: no such file"),
        (import_args(release, out, tmp_path / "nope.json"), f"error: {tmp_path / 'nope.json'}: no such file"),
    ]
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(release / "model.safetensors", bare / "model.safetensors")
    cases.append((import_args(bare, out, release / "siglip.json"),
                  f"error: {bare / 'config.json'}: no config.json next to the checkpoint; pass --config"))
    for argv, says in cases:
        assert main(argv) == 1
        assert one_error(capsys) == says
    assert not out.exists()


def test_unwritable_outputs_are_refused_before_reading(release, tmp_path, capsys):
    # Before: --out naming a folder failed with a traceback after the conversion.
    a_file = tmp_path / "a_file"
    a_file.write_text("kept")
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    cases = [
        (folder, [], f"--out {folder}: a folder"),
        (a_file / "x.safetensors", [], f"{a_file} is a file, so no folder can be made under it"),
        (tmp_path / "out.bin", [], "the output must be a .safetensors file"),
        (tmp_path / "ok.safetensors", ["--vq-out", str(folder)], f"--vq-out {folder}: a folder"),
    ]
    for out, extra, says in cases:
        # a checkpoint that does not exist: the output is checked first
        assert main(import_args(tmp_path / "none", out, release / "siglip.json") + extra) == 1
        assert says in one_error(capsys)
    assert a_file.read_text() == "kept" and list(folder.iterdir()) == []


def _edit(release, edit):
    config = json.loads((release / "config.json").read_text())
    edit(config)
    return json.dumps(config)


@pytest.mark.parametrize("config, says", [
    (lambda r: "{", "not valid JSON (Expecting property name"),
    (lambda r: "", "not valid JSON (Expecting value"),
    (lambda r: "[]", "expected a JSON object (an official config.json), got a list"),
    (lambda r: "{}", "missing key 'language_config'"),
    (lambda r: '{"language_config": 3}', "language_config: expected a JSON object, got the number 3"),
    (lambda r: _edit(r, lambda c: c.pop("vision_gen_dec_config")), "missing key 'vision_gen_dec_config'"),
    (lambda r: _edit(r, lambda c: c["vision_gen_enc_config"].pop("params")),
     "missing key 'vision_gen_enc_config.params'"),
    (lambda r: _edit(r, lambda c: c["language_config"].update(num_hidden_layers=None)),
     "language_config.num_hidden_layers must be an integer >= 1, got null"),
    (lambda r: _edit(r, lambda c: c["vision_gen_enc_config"]["params"].update(block_out_channels=16)),
     "vision_gen_enc_config.params.block_out_channels must be a list of integers >= 1, got 16"),
    (lambda r: _edit(r, lambda c: c["vision_und_enc_config"]["params"].update(image_size="32")),
     'vision tower params.image_size must be an integer >= 1, got "32"'),
    # a Janus-Pro config.json (gen_head_config) whose sections lack their params
    (lambda r: _edit(r, lambda c: c.update(gen_head_config={}, vision_config={}, aligner_config={},
                                            gen_vision_config={}, gen_aligner_config={})),
     "missing key 'params'"),
    (lambda r: _edit(r, lambda c: c.update({LATENT_KEY: {"latent_codec": "space_to_depth"}})),
     f"{LATENT_KEY}: missing 'latent_scale', 'latent_size'"),
])
def test_bad_config_json_is_named(release, tmp_path, capsys, config, says):
    # Before: a KeyError / TypeError traceback, or a JSON error without the file's name.
    folder = tmp_path / "release"
    shutil.copytree(release, folder)
    (folder / "config.json").write_text(config(release))
    out = tmp_path / "ours.safetensors"
    assert main(import_args(folder, out, folder / "siglip.json")) == 1
    line = one_error(capsys)
    assert line.startswith(f"error: {folder / 'config.json'}: ") and says in line, line
    assert not out.exists()


@pytest.mark.parametrize("siglip, says", [
    ("{", "not valid JSON"),
    ("[]", "got a list"),
    ("{}", "got an empty object"),
    ('{"siglip_test": {"image_size": 32, "patch_size": 8, "width": 32, "heads": 2, "mlp_ratio": 2}}',
     "siglip_test: missing 'layers'"),
    ('{"siglip_test": {"image_size": 32, "patch_size": 8, "layers": 2, "heads": 2, "mlp_ratio": 2}}',
     "siglip_test: missing 'width'"),
    ('{"image_size": 32, "patch_size": 8, "width": 32, "layers": 0, "heads": 2, "mlp_ratio": 2}',
     "layers must be a positive integer, got 0"),
    ('{"siglip_test": "large"}', "siglip_test: expected a SigLIP entry"),
])
def test_bad_siglip_file_is_named(release, tmp_path, capsys, siglip, says):
    path = tmp_path / "siglip.json"
    path.write_text(siglip)
    out = tmp_path / "ours.safetensors"
    assert main(import_args(release, out, path)) == 1
    line = one_error(capsys)
    assert line.startswith(f"error: {path}") and says in line, line
    with pytest.raises(ValueError, match=str(path)):
        read_siglip_file(path)
    assert not out.exists()


def test_bad_latent_size_is_an_option_error(release, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(import_args(release, tmp_path / "o.safetensors", release / "siglip.json") + ["--latent-size", "0"])
    assert stop.value.code == 2 and "--latent-size: 0 must be at least 1" in one_error(capsys)


# ---------------------------------------------------------------------------------------------
# the pixel-space latent (space_to_depth) has no field in the release format
def pixel_config(tiny_model_config_factory):
    """32 px images as 8x8 latents of 4x4 RGB blocks (48 channels), as the CPU recipes."""
    gen = GenerationVisionConfig(latent_size=8, latent_channels=48, patch_size=2, channels=16, num_blocks=1,
                                 time_embed_dim=16, latent_codec="space_to_depth", latent_scale=1.0)
    return tiny_model_config_factory(gen_vision=gen, repa=RepaConfig(enabled=False, layer=2))


def test_pixel_latent_round_trips_through_the_release_config(tiny_model_config_factory):
    # Before: it came back as SDXL-VAE latents (scale 0.13025) of side 48, without a word.
    cfg = pixel_config(tiny_model_config_factory)
    config = release_config_json(cfg, "siglip_test")
    assert config[LATENT_KEY] == {"latent_codec": "space_to_depth", "latent_scale": 1.0, "latent_size": 8}
    assert config_from_release(config, SIGLIP) == cfg
    assert config_from_release(config, SIGLIP, latent_size=8) == cfg
    with pytest.raises(ValueError, match=f"{LATENT_KEY}.latent_size is 8 but latent size 48"):
        config_from_release(config, SIGLIP, latent_size=48)
    # a model on the release's own latent writes exactly the release's keys
    sdxl = tiny_model_config_factory(repa=RepaConfig(enabled=False, layer=2))
    assert LATENT_KEY not in release_config_json(sdxl, "siglip_test")
    bad = dict(config, **{LATENT_KEY: dict(config[LATENT_KEY], latent_codec="jpeg")})
    with pytest.raises(ValueError, match="model.gen_vision.latent_codec: must be 'sdxl_vae' or 'space_to_depth'"):
        config_from_release(bad, SIGLIP)


def test_import_release_keeps_the_pixel_latent(tiny_model_config_factory, tmp_path, capsys):
    cfg = pixel_config(tiny_model_config_factory)
    released(tmp_path, cfg)
    (tmp_path / "siglip.json").write_text(json.dumps(SIGLIP))
    out = tmp_path / "ours.safetensors"
    argv = ["import-release", "--checkpoint", str(tmp_path / "model.safetensors"), "--out", str(out),
            "--siglip", str(tmp_path / "siglip.json")]
    assert main(argv) == 0
    stored = json.loads(read_metadata(out)["model_config"])
    assert stored["gen_vision"] == dataclasses.asdict(cfg.gen_vision)
    assert main(argv + ["--latent-size", "48"]) == 1  # contradicts what config.json records
    assert "leave --latent-size out" in one_error(capsys)
