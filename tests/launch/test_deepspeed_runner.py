"""``deepspeed pretrain/main.py`` (the documented entry point) stops cleanly when the ``deepspeed``
command is terminated: on one node DeepSpeed's runner dies alone on SIGTERM, and the ranks must
notice, checkpoint and exit rather than train on unattended."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch_helpers import REPO, child_env

RECIPE = "recipes/tiny_cpu.yaml"


def _steps_logged(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    return metrics.read_text().count("\n") if metrics.exists() else 0


@pytest.mark.slow
def test_sigterm_to_the_deepspeed_command_checkpoints_and_stops_the_ranks(tmp_path):
    out = tmp_path / "run"
    runner = Path(sys.executable).with_name("deepspeed")
    cmd = [str(runner), "--num_gpus", "1", "--master_port", "0", str(REPO / "pretrain" / "main.py"),
           "--recipe", RECIPE, "--steps", "1000", "--set", f"train.output_dir={out}",
           "--set", "train.save_interval=1000", "--set", "optim.steps=1000", "--set", "train.image_interval=0"]
    log = open(tmp_path / "output.txt", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and _steps_logged(out) < 2 and proc.poll() is None:
            time.sleep(0.5)
        assert _steps_logged(out) >= 2, (tmp_path / "output.txt").read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)  # the runner alone: it has no handler on one node
        proc.wait(timeout=30)
        latest = out / "checkpoints" / "latest"
        deadline = time.time() + 240
        while time.time() < deadline and not latest.exists():
            time.sleep(0.5)
        assert latest.exists(), (tmp_path / "output.txt").read_text()[-3000:]
        tag = latest.read_text().strip()
        assert (out / "checkpoints" / tag / "COMPLETE").exists()
        # The ranks (and the launcher) exit by themselves once the checkpoint is written.
        deadline = time.time() + 120
        while time.time() < deadline and _session_alive(proc.pid):
            time.sleep(0.5)
        assert not _session_alive(proc.pid), "ranks still running after the deepspeed command ended"
        text = (tmp_path / "output.txt").read_text()
        assert "the deepspeed command that launched this run has ended" in text
        last = max(json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines())
        assert tag == f"step_{last:08d}"
    finally:
        if _session_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _session_alive(session: int) -> bool:
    """Whether any process of the session the runner started (its launcher, the ranks) is alive."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":  # session id, not a zombie
            return True
    return False
