"""Training through DeepSpeed's pipeline engine (pipeline_parallel=2) follows the one-process run.

Both runs start (train.init_from) from the checkpoint of a one-step one-process run, which the
pipeline run reads in its own layout. The first stage owns the
embeddings, SigLIP, the generation encoder and REPA (block 2 of 4); the last stage owns the output
layer and the generation decoder, so every objective crosses the stage boundary: L_AR and L_RF flow
back through the sent hidden states and the generation skip, REPA's term rides forward to the last
stage's loss and its gradient back. Losses, the clipped gradient norm (DeepSpeed's, over both stages)
and the trained weights (read back from the pipeline checkpoint by the exporter) must agree; a PP run
stopped and resumed from its checkpoint equals the uninterrupted one; the stages sample the
TensorBoard grid together and get the one-process images.
"""

import json
import subprocess

import pytest
import numpy as np
import torch
from PIL import Image

from tests.launch_helpers import REPO, child_env, copy_run_at, run_main, torchrun_cmd
from tests.train.tiny_runs import export_weights

# Multi-process or multi-run end-to-end tests: outside the quick lane (pytest -m "not slow").
pytestmark = pytest.mark.slow

KEYS = ("loss/total", "loss/ar", "loss/rf", "loss/repa", "grad_norm")


def _metrics(out):
    return {json.loads(l)["step"]: json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()}


def _train(nproc, out, start, steps, pp, *overrides):
    init = [f"train.init_from={start}"] if start else []
    sets = [a for o in (f"train.output_dir={out}", *init, f"parallel.pipeline_parallel={pp}",
                        "parallel.global_batch_size=4", "train.save_interval=2", *overrides) for a in ("--set", o)]
    proc = run_main(nproc, "--recipe", "recipes/tiny_cpu.yaml", "--steps", str(steps), *sets)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_pp2_training_matches_one_process_and_resumes(tmp_path):
    weights = tmp_path / "start"
    _train(1, weights, None, 1, 1)

    _train(1, tmp_path / "pp1", weights, 4, 1, "train.image_interval=4")
    two = _train(2, tmp_path / "pp2", weights, 4, 2, "train.image_interval=4")
    assert "(tp 1, pp 2, dp 1)" in two.stdout
    a, b = _metrics(tmp_path / "pp1"), _metrics(tmp_path / "pp2")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert a[step]["loss/ar"] > 0 and a[step]["loss/rf"] > 0 and a[step]["loss/repa"] != 0
        for key in KEYS:
            # Only the order of float sums differs (measured 2.7e-8 relative).
            assert abs(a[step][key] - b[step][key]) <= 3e-7 * max(1.0, abs(a[step][key])), (step, key, a[step][key], b[step][key])

    # The sample grid: the two stages sample together and give the one-process images.
    grids = [np.asarray(Image.open(tmp_path / run / "samples" / "step_0000004.png"), dtype=np.int16) for run in ("pp1", "pp2")]
    assert grids[0].shape == grids[1].shape and np.abs(grids[0] - grids[1]).max() <= 2

    # The pipeline checkpoint holds one file per stage; the exporter puts the stages back together.
    ckpt = tmp_path / "pp2" / "checkpoints" / "step_00000004"
    assert (ckpt / "layer_00-model_00-model_states.pt").exists() and (ckpt / "layer_01-model_00-model_states.pt").exists()
    one_w, two_w = export_weights(tmp_path / "pp1", tmp_path / "pp1.safetensors"), export_weights(tmp_path / "pp2", tmp_path / "pp2.safetensors")
    start = export_weights(weights, tmp_path / "start.safetensors")
    assert sorted(one_w) == sorted(two_w) == sorted(start)
    moved = 0
    for key, value in one_w.items():
        assert torch.allclose(value, two_w[key], atol=1e-5, rtol=0), key  # measured 3.5e-6 (Adam's normalisation)
        moved += not torch.equal(value, start[key])
    assert moved > len(start) // 2  # training changed most tensors, on both stages

    # Restart from the pipeline checkpoint of step 2: the same steps 3 and 4 as the straight run. The
    # restart begins from a copy of the straight run's own step-2 checkpoint (as after a crash there)
    # rather than from a second 2-process run up to step 2.
    resumed_dir = copy_run_at(tmp_path / "pp2", tmp_path / "resumed", 2)
    resumed = _train(2, resumed_dir, weights, 4, 2, "train.image_interval=4")
    assert "resumed from" in resumed.stdout
    c = _metrics(tmp_path / "resumed")
    for step in (3, 4):
        for key in KEYS:
            assert c[step][key] == b[step][key], (step, key, c[step][key], b[step][key])


def test_pipeline_skips_nan_steps_then_stops(tmp_path):
    # As in the one-process test: an absurd learning rate makes every gradient after the first
    # update NaN/Inf; the overflow check must agree across both stages and skip those steps.
    out = tmp_path / "nan"
    sets = [a for o in (f"train.output_dir={out}", "parallel.pipeline_parallel=2", "parallel.global_batch_size=4",
                        "optim.lr=1e30", "train.max_consecutive_skipped_steps=3") for a in ("--set", o)]
    proc = subprocess.run(torchrun_cmd(2, REPO / "pretrain" / "main.py", "--recipe", "recipes/tiny_cpu.yaml",
                                       "--steps", "10", *sets),
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode != 0
    assert "3 consecutive steps had a NaN/Inf" in proc.stdout + proc.stderr
    rows = _metrics(out)
    assert [rows[s]["skipped_steps"] for s in sorted(rows)] == [0.0, 1.0, 2.0, 3.0]


def test_three_stages_with_a_middle_stage_match_one_process(tmp_path):
    # Six blocks over three stages: the middle stage only passes the skip, time embedding and REPA
    # term through (empty ones in step 1's micro-batch without generation samples).
    six = ("model.llm.num_layers=6", "train.image_interval=0")
    start = tmp_path / "start"
    _train(1, start, None, 1, 1, *six)
    _train(1, tmp_path / "pp1", start, 2, 1, *six)
    three = _train(3, tmp_path / "pp3", start, 2, 3, *six)
    assert "(tp 1, pp 3, dp 1)" in three.stdout
    a, b = _metrics(tmp_path / "pp1"), _metrics(tmp_path / "pp3")
    for step in (1, 2):
        for key in KEYS:  # measured 3.8e-8 relative
            assert abs(a[step][key] - b[step][key]) <= 3e-7 * max(1.0, abs(a[step][key])), (step, key, a[step][key], b[step][key])
