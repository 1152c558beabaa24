"""Export a trained run (EMA or raw) to the released layout; it imports back to the same tensors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from pretrain.convert.release import config_from_release, release_to_ours
from pretrain.export import main as export_main
from tests.launch_helpers import REPO, main_in_process


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    proc = main_in_process("--recipe", "recipes/tiny_cpu.yaml", "--steps", "3", "--set", f"train.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _reimport(folder):
    config = json.loads((folder / "config.json").read_text())
    siglip = json.loads((folder / "siglip_entry.json").read_text())
    cfg = config_from_release(config, siglip, latent_size=8)
    return release_to_ours(load_file(folder / "model.safetensors"), cfg)


@pytest.mark.slow
def test_raw_and_ema_exports_round_trip(run_dir, tmp_path):
    assert export_main(["--run", str(run_dir), "--weights", "raw", "--out", str(tmp_path / "raw")]) == 0
    assert export_main(["--run", str(run_dir), "--weights", "ema", "--out", str(tmp_path / "ema")]) == 0
    raw, ema = _reimport(tmp_path / "raw"), _reimport(tmp_path / "ema")
    ckpt = run_dir / "checkpoints" / "step_00000003"
    module = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    module = {k: v for k, v in module.items() if not k.endswith("_extra_state")}
    # One data-parallel rank: its EMA fragments are whole (flattened) parameters.
    averages = load_file(ckpt / "ema_mp0_0_dp0.safetensors")
    assert set(raw) == set(module) - {k for k in module if k.startswith("repa_projector")}
    for key, value in raw.items():
        assert torch.equal(value, module[key]), key
        assert torch.equal(ema[key], averages[key].reshape(ema[key].shape)), key
    # After 3 updates with decay 0.99 the averages are not the weights.
    assert not torch.equal(ema["llm.embedding.weight"], raw["llm.embedding.weight"])


def test_missing_run_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "recipe.yaml").write_text((REPO / "recipes" / "tiny_cpu.yaml").read_text())
    assert export_main(["--run", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def _copy_run(run_dir, dest):
    import shutil

    shutil.copytree(run_dir, dest)
    return dest


def _edit_recipe(run, old, new):
    recipe = run / "recipe.yaml"
    text = recipe.read_text()
    assert old in text
    recipe.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize("edit, says", [
    (("num_layers: 4", "num_layers: 3"), "has no place for, e.g. llm.decoder.layers.3."),
    (("num_layers: 4", "num_layers: 5"), "lacks"),
    (("hidden_size: 64", "hidden_size: 96"), "wrong shape llm.embedding.weight"),
])
@pytest.mark.parametrize("fmt", ["ours", "release"])
def test_a_recipe_edited_since_training_is_refused(run_dir, tmp_path, capsys, edit, says, fmt):
    # Before: 3 of 4 layers were exported without a word (exit 0), 5 or a wider model a traceback
    # (ours: exit 0 with tensors no model of the recipe can load).
    run = _copy_run(run_dir, tmp_path / "run")
    _edit_recipe(run, *edit)
    out = tmp_path / ("w.safetensors" if fmt == "ours" else "release")
    assert export_main(["--run", str(run), "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err, err
    assert not out.exists()


def test_weights_are_exported_when_only_optimizer_and_trainer_files_are_lost(run_dir, tmp_path, capsys):
    run = _copy_run(run_dir, tmp_path / "run")
    ckpt = run / "checkpoints" / "step_00000003"
    lost = sorted(ckpt.glob("*optim_states.pt")) + sorted(ckpt.glob("trainer_rank*.json"))
    assert lost
    for f in lost:
        f.unlink()
    out = tmp_path / "w.safetensors"
    assert export_main(["--run", str(run), "--format", "ours", "--weights", "raw", "--out", str(out)]) == 0
    assert "step_00000003" in capsys.readouterr().out
    module = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    exported = load_file(out)
    assert torch.equal(exported["llm.embedding.weight"], module["llm.embedding.weight"])
    # A lost weights file still makes the checkpoint unusable, and the advice fits an export.
    (ckpt / "mp_rank_00_model_states.pt").unlink()
    assert export_main(["--run", str(run), "--format", "ours", "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "mp_rank_00_model_states.pt: missing" in err and "no checkpoint of this run has intact weights" in err


@pytest.mark.parametrize("manifest", ["[]", '{"files": []}', '{"files": {"a.pt": "x"}}',
                                      '{"files": {"a.pt": {"sha256": "00"}}}',
                                      '{"files": {"a.pt": {"bytes": "1", "sha256": "00"}}}'])
def test_a_manifest_of_the_wrong_shape_is_a_damaged_manifest(run_dir, tmp_path, capsys, manifest):
    run = _copy_run(run_dir, tmp_path / "run")
    (run / "checkpoints" / "step_00000003" / "MANIFEST.json").write_text(manifest)
    args = ["--run", str(run), "--tag", "step_00000003", "--format", "ours", "--out", str(tmp_path / "w.safetensors")]
    assert export_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "damaged manifest" in err and len(err.splitlines()) == 1, err


def test_an_output_path_that_cannot_be_written_is_refused_before_reading(tmp_path, capsys):
    # No run at all: the output is checked first, so its error is the one reported.
    a_file = tmp_path / "a_file"
    a_file.write_text("hi")
    (tmp_path / "d.safetensors").mkdir()
    cases = [
        (["--format", "release", "--out", str(a_file)], "an existing file"),
        (["--format", "release", "--out", str(a_file / "sub")], "is a file, so no folder"),
        (["--format", "ours", "--out", str(a_file / "w.safetensors")], "is a file, so no folder"),
        (["--format", "ours", "--out", str(tmp_path / "d.safetensors")], "a folder; --format ours writes one file"),
    ]
    for args, says in cases:
        assert export_main(["--run", str(tmp_path / "no_run"), *args]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.splitlines()) == 1, (args, err)


def test_our_format_carries_the_model_config_the_samplers_read(run_dir, tmp_path):
    # Before: no model_config metadata, so pretrain.sample and pretrain.chat refused the file without --config.
    from pretrain.recipe import load_recipe
    from pretrain.sample.loading import resolve_model

    out = tmp_path / "w.safetensors"
    assert export_main(["--run", str(run_dir), "--format", "ours", "--out", str(out)]) == 0
    cfg, state = resolve_model(out)
    assert cfg == load_recipe(REPO / "recipes" / "tiny_cpu.yaml").model
    assert state.keys() == load_file(out).keys()
