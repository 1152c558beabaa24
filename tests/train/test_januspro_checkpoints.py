"""A trained Janus-Pro run leaves the trainer the same ways a JanusFlow run does: exported in our
names (raw weights = the checkpoint's, EMA = its averages), in the released layout (model part
bit-exact through the release converter and back), and through a universal checkpoint that a run
in another tensor-parallel layout resumes from (TP 2 -> TP 1), continuing the uninterrupted run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from pretrain.convert import januspro
from pretrain.export import main as export_main, release_config, release_state, run_weights
from pretrain.train.universal import convert
from tests.launch_helpers import copy_run_at
from tests.train.januspro_runs import run_metrics as _metrics, train_run

# Multi-process or multi-run end-to-end tests: outside the quick lane (pytest -m "not slow").
pytestmark = pytest.mark.slow

# The released layout has the VQ-16 tokenizer only: codes of 16 x 16 pixels (a 2 x 2 grid at 32 px).
VQ16 = ["model.image_tokens.codec=vq16", "model.image_tokens.downsample=16"]


def _train(out, steps, nproc=1, *overrides):
    return train_run(out, steps, nproc, "parallel.global_batch_size=2", "train.save_interval=1", "train.keep_last=5",
                     *overrides)


def test_exports_in_our_names_and_the_released_layout(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _train(run, 3, 1, *VQ16)
    for weights in ("raw", "ema"):
        out = str(tmp_path / f"{weights}.safetensors")
        assert export_main(["--run", str(run), "--weights", weights, "--format", "ours", "--out", out]) == 0
    raw, ema = load_file(tmp_path / "raw.safetensors"), load_file(tmp_path / "ema.safetensors")
    ckpt = run / "checkpoints" / "step_00000003"
    module = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    module = {k: v for k, v in module.items() if not k.endswith("_extra_state")}
    averages = load_file(ckpt / "ema_mp0_0_dp0.safetensors")  # one rank: whole (flattened) parameters
    assert set(raw) == set(module) and {"gen_embed.weight", "gen_head.2.weight", "und_aligner.0.weight"} <= set(raw)
    for key, value in raw.items():
        assert torch.equal(value, module[key]), key
        assert torch.equal(ema[key], averages[key].reshape(ema[key].shape)), key
    assert not torch.equal(ema["gen_head.2.weight"], raw["gen_head.2.weight"])  # 3 updates at decay 0.99

    # The released layout: the model part converts back bit for bit. The VQ-16 (72M numbers at any
    # codebook size) stands in as meta tensors: the export only passes it through.
    from image_codecs import vq16

    full, cfg, _ = run_weights(run, None, "raw")
    vq_shapes = januspro._vq_shapes(cfg.image_tokens.codebook_size)
    monkeypatch.setattr(vq16, "read_vq16_state",
                        lambda path: {k: torch.empty(s, device="meta") for k, s in vq_shapes.items()})
    release = release_state(full, cfg, tmp_path / "vq16.safetensors", run)
    assert {k for k in release if k.startswith("gen_vision_model.")} == {f"gen_vision_model.{k}" for k in vq_shapes}
    back = januspro.release_to_ours(release, cfg)
    assert sorted(back) == sorted(full)
    assert all(torch.equal(back[k], full[k]) for k in full)
    config = release_config(cfg, tmp_path)
    siglip = json.loads((tmp_path / "siglip_entry.json").read_text())  # the tiny tower's table entry
    again = januspro.config_from_release(config, siglip)
    assert (again.llm, again.und_encoder, again.image_tokens) == (cfg.llm, cfg.und_encoder, cfg.image_tokens)


def test_release_export_names_the_missing_vq(tmp_path, capsys):
    run = tmp_path / "run"
    _train(run, 1, 1, *VQ16)
    assert export_main(["--run", str(run), "--out", str(tmp_path / "release")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --vq:") and err.count("\n") == 1


@pytest.mark.timeout(1200)  # two runs, one of them on two processes
def test_tp2_run_resumes_on_one_rank_from_a_universal_checkpoint(tmp_path):
    straight, moved = tmp_path / "straight", tmp_path / "moved"
    _train(straight, 3, 2, "parallel.tensor_parallel=2")
    # The TP 2 run as it stood at its step-2 checkpoint (a copy rather than a second TP 2 launch).
    copy_run_at(straight, moved, 2)
    tag = convert(moved)
    assert tag == "step_00000002_universal"
    resumed = _train(moved, 3, 1)
    assert f"resumed from {moved / 'checkpoints' / tag} at step 2" in resumed.stdout
    assert "layout changed" in resumed.stdout
    a, b = _metrics(straight), _metrics(moved)
    # Step 3 on one rank from the merged TP slices and Adam moments = step 3 of the TP 2 run (same
    # data and draws: the stream replays by step); TP 2 vs TP 1 rounding at most (measured: equal to the
    # last digit; TP 2 vs TP 1 from the start differ by up to 1.1e-7, tests/train/test_januspro_parallel.py).
    for key in ("loss/total", "loss/ar", "loss/image", "grad_norm"):
        assert abs(a[3][key] - b[3][key]) <= 3e-7 * max(1.0, abs(a[3][key])), (key, a[3][key], b[3][key])
