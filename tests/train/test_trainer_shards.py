"""Training from real shards: data_tools output -> PackedLoader -> DeepSpeed trainer, resumable.

The generation side uses the pixel-space latent (space_to_depth), so no VAE weights are needed.
"""

import json
import shutil

import pytest

from tests.data_fixtures import build_tiny_recipe_shards
from tests.launch_helpers import copy_run_at, main_in_process

# Multi-process or multi-run end-to-end tests: outside the quick lane (pytest -m "not slow").
pytestmark = pytest.mark.slow


def _run(out, root, steps, *sets):
    return main_in_process("--recipe", "recipes/tiny_cpu.yaml", "--steps", str(steps), "--set", f"train.output_dir={out}",
                           "--set", f"data.root={root}", "--set", "data.loader_workers=0", "--set", "train.save_interval=2",
                           *(arg for s in sets for arg in ("--set", s)))


def _train(out, root, steps):
    proc = _run(out, root, steps)
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

    # The shards rebuilt with other contents (here: another checksum for one und shard): the step-2
    # checkpoint's data position counts items of the old ones. Refused with one line, or continued
    # when asked for, with a line in the log. Before: continued silently in another data order.
    rebuilt = tmp_path / "rebuilt"
    shutil.copytree(data, rebuilt)
    manifest = json.loads((rebuilt / "manifest.json").read_text())
    manifest["tasks"]["und"]["shards"][0]["sha256"] = "0" * 64
    (rebuilt / "manifest.json").write_text(json.dumps(manifest))
    copy_run_at(tmp_path / "straight", tmp_path / "refused", 2)
    proc = _run(tmp_path / "refused", rebuilt, 4)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: data.root: {rebuilt / 'manifest.json'}: the und shards are not those the checkpoint's data position "
        "counts in (rebuilt with other contents since?), so the run would not continue its data order; restore the "
        "shards it was trained on, or set data.resume_on_changed_shards=true to continue over these (a new order "
        "from the same counts)")
    copy_run_at(tmp_path / "straight", tmp_path / "continued", 2)
    proc = _run(tmp_path / "continued", rebuilt, 4, "data.resume_on_changed_shards=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("[train] the und shards changed since the checkpoint (data.resume_on_changed_shards): their streams "
            "continue from the same counts in the new shards' order") in proc.stdout

