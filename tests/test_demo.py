"""The demo chain runs end to end at toy size: synth -> shards -> 2-process DeepSpeed -> samples -> eval."""

import json
import subprocess
import sys

import pytest

from tests.launch_helpers import REPO, child_env

# Multi-process or multi-run end-to-end tests: outside the quick lane (pytest -m "not slow").
pytestmark = pytest.mark.slow


def test_demo_chain_at_toy_size(tmp_path):
    cmd = [sys.executable, "-m", "pretrain.demo", "--out", str(tmp_path), "--train-samples", "40", "--heldout", "6",
           "--steps", "2", "--euler-steps", "2"]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["generation"]["total"] == 6 and report["generation"]["missing"] == 0
    assert report["qa"]["total"] == 6 and report["qa"]["missing"] == 0
    assert (tmp_path / "samples_grid.png").exists()
    assert "generation colour accuracy" in proc.stdout
