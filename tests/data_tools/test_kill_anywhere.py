"""kill -9 at arbitrary moments, not only at unit boundaries: of the whole build (main process and its
workers) or of one worker. The re-run, or the build itself for a worker, gives byte-identical shards."""

from __future__ import annotations

import glob
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_tools.synthetic import tiny_build_args
from tests.launch_helpers import REPO, child_env

pytestmark = pytest.mark.slow

OPTIONS = ("--shard-rows", "1", "--chunk-records", "3", "--workers", "2")


def _shard_bytes(out: str) -> dict[str, bytes]:
    return {os.path.relpath(p, out): Path(p).read_bytes() for p in sorted(glob.glob(os.path.join(out, "*", "*.arrow")))}


def _build(corpus, tokenizer_dir, out: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "data_tools", *tiny_build_args(corpus, tokenizer_dir, out, *OPTIONS)]
    return subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.fixture(scope="module")
def reference(corpus, tokenizer_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("reference") / "out")
    started = time.monotonic()
    proc = _build(corpus, tokenizer_dir, out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    return _shard_bytes(out), time.monotonic() - started


@pytest.mark.parametrize("fraction", [0.2, 0.4, 0.6])
def test_kill_the_whole_build_at_any_moment_then_rerun(corpus, tokenizer_dir, tmp_path, reference, fraction):
    shards, seconds = reference
    out = str(tmp_path / "out")
    delay = fraction * seconds
    for _ in range(4):  # a build that finished before the kill (a faster machine) tries an earlier moment
        shutil.rmtree(out, ignore_errors=True)
        proc = _build(corpus, tokenizer_dir, out)
        time.sleep(delay)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the main process and its workers, mid-whatever
        proc.communicate(timeout=60)
        if proc.returncode == -signal.SIGKILL:
            break
        delay /= 2
    assert proc.returncode == -signal.SIGKILL, "the build always ended before the kill"
    rerun = _build(corpus, tokenizer_dir, out)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err.decode()[-2000:]
    assert _shard_bytes(out) == shards
    assert not glob.glob(os.path.join(out, "*", "*.tmp"))


@pytest.mark.parametrize("seed", [1, 2])
def test_kill_one_worker_at_a_random_moment(corpus, tokenizer_dir, tmp_path, reference, seed):
    shards, seconds = reference
    out = str(tmp_path / "out")
    rng = random.Random(seed)
    delay = rng.uniform(0.15, 0.45) * seconds
    for _ in range(4):  # the workers may be gone before the moment (a faster machine): try earlier
        shutil.rmtree(out, ignore_errors=True)
        proc = _build(corpus, tokenizer_dir, out)
        deadline, killed = time.monotonic() + delay, None
        while proc.poll() is None and killed is None:
            workers = _children(proc.pid)
            if time.monotonic() >= deadline and workers:
                killed = rng.choice(workers)
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.02)
        _, err = proc.communicate(timeout=300)
        if killed is not None:
            break
        delay /= 2
    assert killed is not None, "the build always ended before a worker could be killed"
    assert proc.returncode == 0, err.decode()[-2000:]
    assert _shard_bytes(out) == shards
