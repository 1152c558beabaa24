"""The main entry point trains the tiny recipe end to end and reports bad recipes clearly."""

import subprocess
import sys

from tests.launch_helpers import REPO, child_env


def _main(*args):
    return subprocess.run([sys.executable, "-m", "pretrain.main", *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=300)


def test_tiny_recipe_trains_and_loss_falls(tmp_path):
    proc = _main("--recipe", "recipes/tiny_cpu.yaml", "--steps", "12", "--set", f"train.output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = [float(line.split(" loss ")[1].split()[0]) for line in proc.stdout.splitlines() if "] step " in line]
    assert len(losses) == 12
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    assert (tmp_path / "checkpoints" / "latest").exists()
    # The trainer logged the recipe's sample grid (train.image_interval=10) at step 10 only.
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_0000010.png"]
    assert "sample grid of step 10" in proc.stdout


def test_bad_override_names_the_key():
    proc = _main("--recipe", "recipes/tiny_cpu.yaml", "--set", "optim.lrr=1")
    assert proc.returncode == 2
    assert "optim.lrr" in proc.stderr and "did you mean lr" in proc.stderr
