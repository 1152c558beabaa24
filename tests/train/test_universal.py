"""Changing the layout through a universal checkpoint: 2 data-parallel ranks (ZeRO-2) -> 1 rank (refused
without conversion); 2 pipeline stages -> 1. Conversion and resume unpickle weights-only."""

import json
import subprocess
import sys

import pytest
import torch

from pretrain.recipe import load_recipe
from pretrain.train.checkpoint import EMA_FULL_FILE
from pretrain.train.offline_weights import checkpoint_weights
from pretrain.train.universal import convert
from tests.launch_helpers import REPO, child_env, copy_run_at, main_in_process, run_main

# Multi-process or multi-run end-to-end tests: outside the quick lane (pytest -m "not slow").
pytestmark = pytest.mark.slow


def _module_weights(path):
    module = torch.load(path, map_location="cpu", weights_only=True)["module"]
    return {k: v for k, v in module.items() if not k.endswith("_extra_state")}


def test_resume_on_fewer_ranks_from_a_universal_checkpoint(two_rank_straight_run, tmp_path):
    # The session's 2-rank ZeRO-2 run (tests/train/conftest.py) as it stood at its step-2 checkpoint.
    out = copy_run_at(two_rank_straight_run, tmp_path / "run", 2)
    sets = [a for o in (f"train.output_dir={out}", "parallel.zero_stage=2", "train.save_interval=1")
            for a in ("--set", o)]

    # Without conversion the new layout is refused before anything is built, with the fix named
    # (DeepSpeed itself would fail deep inside its loader), in one line: the whole console of a child.
    unconverted = subprocess.run(
        [sys.executable, "-m", "pretrain.main", "--recipe", "recipes/tiny_cpu.yaml", "--steps", "3", *sets],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert unconverted.returncode == 2
    assert unconverted.stderr.startswith("error: parallel: ") and unconverted.stderr.count("\n") == 1
    assert "python -m pretrain.train.universal" in unconverted.stderr and "dp 2" in unconverted.stderr

    tag = convert(out)
    assert tag == "step_00000002_universal"
    assert (out / "checkpoints" / "latest").read_text().strip() == tag

    second = main_in_process("--recipe", "recipes/tiny_cpu.yaml", "--steps", "3", *sets)
    assert second.returncode == 0, second.stderr[-4000:]
    assert f"resumed from {out / 'checkpoints' / tag} at step 2" in second.stdout
    assert "layout changed" in second.stdout

    # One more AdamW step (lr 1e-3, |update| <= lr plus rounding) separates step 3 from step 2: the
    # weights and optimizer moments really were restored, not re-initialised (which moves ~0.02).
    before = _module_weights(out / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt")
    after = _module_weights(out / "checkpoints" / "step_00000003" / "mp_rank_00_model_states.pt")
    assert before.keys() == after.keys()
    moved = max(float((after[k] - before[k]).abs().max()) for k in before)
    assert 0 < moved <= 1.5e-3, moved


def _train(out, steps, *overrides, nproc=1):
    sets = [a for o in (f"train.output_dir={out}", "train.save_interval=2", *overrides) for a in ("--set", o)]
    proc = run_main(nproc, "--recipe", "recipes/tiny_cpu.yaml", "--steps", str(steps), *sets)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _metrics(out):
    return {json.loads(l)["step"]: json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()}


def _adam_state(run, tag):
    # DeepSpeed's optimizer file pickles Python objects (it loads it the same way); this test wrote it.
    state = torch.load(run / "checkpoints" / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                       map_location="cpu", weights_only=False)["optimizer_state_dict"]
    return state["base_optimizer_state"]["state"][0]


def test_pipeline_checkpoint_resumes_without_pipeline_from_a_universal_checkpoint(tmp_path):
    """PP=2 for 2 steps, universal conversion, PP=1 for steps 3-4: the same steps 3-4, Adam moments,
    step count, weights and EMA as an uninterrupted PP=1 run (PP=2 and PP=1 agree to ~1e-6, not
    bit for bit). Both start from one checkpoint (random initialisation depends on the layout)."""
    start = tmp_path / "start"
    _train(start, 1)
    straight, moved = tmp_path / "straight", tmp_path / "moved"
    _train(straight, 4, f"train.init_from={start}")
    _train(moved, 2, f"train.init_from={start}", "parallel.pipeline_parallel=2", nproc=2)

    tag = convert(moved)
    universal = moved / "checkpoints" / tag
    # Parameters are recorded under their full-state names, whatever stage held them.
    assert (universal / "zero" / "llm.decoder.layers.3.mlp.linear_fc1.weight" / "exp_avg.pt").exists()
    assert (universal / EMA_FULL_FILE).exists()

    resumed = _train(moved, 4)
    assert f"resumed from {universal} at step 2" in resumed.stdout
    assert "EMA restarts" not in resumed.stdout
    a, b = _metrics(straight), _metrics(moved)
    for step in (3, 4):
        for key in ("loss/total", "loss/ar", "loss/rf", "loss/repa", "grad_norm"):
            # measured 2.7e-8 relative
            assert abs(a[step][key] - b[step][key]) <= 3e-7 * max(1.0, abs(a[step][key])), (step, key)

    # The optimizer went on (step count 4, moments of all four gradients), not restarted at step 2.
    ref, got = _adam_state(straight, "step_00000004"), _adam_state(moved, "step_00000004")
    assert float(got["step"]) == float(ref["step"]) == 4
    for key in ("exp_avg", "exp_avg_sq"):
        scale = float(ref[key].abs().max())
        assert float((got[key] - ref[key]).abs().max()) <= 1e-5 * scale, key

    cfg = load_recipe(straight / "recipe.yaml").model
    for weights in ("raw", "ema"):
        one = checkpoint_weights(straight / "checkpoints", "step_00000004", cfg, weights)
        two = checkpoint_weights(moved / "checkpoints", "step_00000004", cfg, weights)
        assert one.keys() == two.keys()
        for key in one:
            assert torch.allclose(one[key], two[key], atol=2e-5, rtol=1e-4), (weights, key)
