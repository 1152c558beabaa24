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
