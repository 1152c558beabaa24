"""Changing the data-parallel layout through a universal checkpoint: 2 ranks (ZeRO-2) -> 1 rank."""

import subprocess
import sys

import torch

from pretrain.train.universal import convert
from tests.launch_helpers import REPO, child_env, torchrun_cmd


def _module_weights(path):
    module = torch.load(path, map_location="cpu", weights_only=True)["module"]
    return {k: v for k, v in module.items() if not k.endswith("_extra_state")}


def test_resume_on_fewer_ranks_from_a_universal_checkpoint(tmp_path):
    out = tmp_path / "run"
    sets = [a for o in (f"train.output_dir={out}", "parallel.zero_stage=2", "train.save_interval=1")
            for a in ("--set", o)]
    first = subprocess.run(
        torchrun_cmd(2, REPO / "pretrain" / "main.py", "--recipe", "recipes/tiny_cpu.yaml", "--steps", "2", *sets),
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-4000:]

    tag = convert(out)
    assert tag == "step_00000002_universal"
    assert (out / "checkpoints" / "latest").read_text().strip() == tag

    second = subprocess.run(
        [sys.executable, "-m", "pretrain.main", "--recipe", "recipes/tiny_cpu.yaml", "--steps", "3", *sets],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
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
