"""A build lock left by a killed process no longer hangs the runtime's start; a live build's is kept.

torch's JIT extension build waits, with no time limit, for a ``lock`` file in the op's build folder
that the builder removes when done. Each case copies the environment's built ``deepspeed_shm_comm``
folder (up to date, so nothing compiles) into an extension folder of its own and starts the runtime
in a fresh process there.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch_helpers import REPO, child_env

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock and /proc/locks: Linux")

OP = "deepspeed_shm_comm"
START = "from pretrain.runtime.distributed import init_runtime; init_runtime(); print('started', flush=True)"


@pytest.fixture
def extension_dir(runtime, tmp_path):
    """A copy of this environment's built op (the session's runtime built or loaded it)."""
    built = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / OP
    assert (built / f"{OP}.so").exists(), built
    root = tmp_path / "torch_extensions"
    shutil.copytree(built, root / OP, ignore=shutil.ignore_patterns("lock"))
    return root


def _start(root: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", START], cwd=REPO, env=child_env(TORCH_EXTENSIONS_DIR=str(root)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_lock_left_by_a_killed_build_is_removed_with_one_line(extension_dir):
    stale = extension_dir / OP / "lock"
    stale.touch()  # what a builder killed mid-build leaves
    proc = _start(extension_dir)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0 and out.strip().endswith("started"), err[-3000:]
    assert f"[runtime] removing {stale}: left by a process killed while it built" in err
    assert not stale.exists()


def _someone_waits_for(path: Path, timeout: float = 240) -> bool:
    """Whether a process waits for the flock on ``path``: ``/proc/locks`` lists a blocked request as
    ``N: -> FLOCK ADVISORY WRITE PID MAJOR:MINOR:INODE ...``."""
    inode = os.stat(path).st_ino
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if fields[1:3] == ["->", "FLOCK"] and fields[6].endswith(f":{inode}"):
                return True
        time.sleep(0.2)
    return False


def test_a_live_build_keeps_its_lock_and_the_start_waits_for_it(extension_dir):
    lock = extension_dir / OP / "lock"
    lock.touch()
    flock_file = extension_dir / f".{OP}.flock"
    with open(flock_file, "a") as builder:  # a live build holds both
        fcntl.flock(builder, fcntl.LOCK_EX)
        proc = _start(extension_dir)
        try:
            assert _someone_waits_for(flock_file), "the start never reached the build's flock"
            time.sleep(1.0)
            assert lock.exists() and proc.poll() is None  # waiting, the build's lock untouched
        except BaseException:
            proc.kill()
            raise
        lock.unlink()  # the build ends: it removes its lock, then drops the flock
        fcntl.flock(builder, fcntl.LOCK_UN)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0 and out.strip().endswith("started"), err[-3000:]
    assert "[runtime] removing" not in err
