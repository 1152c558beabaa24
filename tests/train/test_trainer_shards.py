"""Training from real shards: data_tools output -> PackedLoader -> DeepSpeed trainer, resumable.

The generation side uses the pixel-space latent (space_to_depth), so no VAE weights are needed.
"""

import json

import pytest

from tests.data_fixtures import build_tiny_recipe_shards
from tests.launch_helpers import copy_run_at, main_in_process

# Multi-process or multi-run end-to-end tests: outside the quick lane (pytest -m "not slow").
pytestmark = pytest.mark.slow


def _train(out, root, steps):
    proc = main_in_process("--recipe", "recipes/tiny_cpu.yaml", "--steps", str(steps), "--set", f"train.output_dir={out}",
                           "--set", f"data.root={root}", "--set", "data.loader_workers=0", "--set", "train.save_interval=2")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return {json.loads(l)["step"]: json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()}


def test_train_on_shards_and_resume(tmp_path):
    data = build_tiny_recipe_shards(tmp_path, n_und=10, n_gen=10, n_llava=6, n_text=10)

    straight = _train(tmp_path / "straight", data, 4)
    # Restarted from the straight run's own step-2 checkpoint (its data cursor included), copied, rather
    # than from a second run up to step 2.
    copy_run_at(tmp_path / "straight", tmp_path / "resumed", 2)
    resumed = _train(tmp_path / "resumed", data, 4)
    for step in (3, 4):
        for key in ("loss/total", "loss/ar", "loss/rf", "loss/repa", "mix/understanding_docs", "mix/generation_docs"):
            assert straight[step][key] == resumed[step][key], (step, key)
    seen = {k: sum(row[f"mix/{k}_docs"] for row in straight.values()) for k in ("understanding", "generation", "text")}
    assert all(v > 0 for v in seen.values()), seen
