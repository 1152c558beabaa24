"""A new training stage starts from the previous stage's weights (train.init_from), fresh otherwise."""

import pytest
import torch

from pretrain.train.checkpoint import resolve_checkpoint
from tests.launch_helpers import main_in_process

# Multi-process or multi-run end-to-end tests: outside the quick lane (pytest -m "not slow").
pytestmark = pytest.mark.slow


def _train(out, *sets):
    args = [a for s in (f"train.output_dir={out}", *sets) for a in ("--set", s)]
    proc = main_in_process("--recipe", "recipes/tiny_cpu.yaml", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _weights(run, tag):
    module = torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    return {k: v for k, v in module.items() if not k.endswith("_extra_state")}


def test_next_stage_starts_from_previous_weights(tmp_path):
    first, second = tmp_path / "stage_a", tmp_path / "stage_b"
    _train(first, "optim.steps=2", "optim.warmup_steps=0")
    # A learning rate of ~0 makes the next stage's first checkpoint hold its starting weights.
    log = _train(second, f"train.init_from={first}", "optim.steps=1", "optim.warmup_steps=0", "optim.lr=1e-30")
    assert f"initialised from {first / 'checkpoints'}" in log and "step 1/1" in log
    before, after = _weights(first, "step_00000002"), _weights(second, "step_00000001")
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=1e-12, rtol=0, msg=key)


def test_checkpoint_paths_accepted_by_init_from(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints"
    (ckpt / "step_00000004").mkdir(parents=True)
    (ckpt / "step_00000004" / "COMPLETE").write_text("ok")
    (ckpt / "latest").write_text("step_00000004")
    for given in (tmp_path / "run", ckpt, ckpt / "latest", ckpt / "step_00000004"):
        assert resolve_checkpoint(given) == (ckpt, "step_00000004")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "nothing")
