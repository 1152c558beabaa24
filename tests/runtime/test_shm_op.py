"""The runtime starts DeepSpeed on the CPU without building its shared-memory all-reduce op, which
nothing here calls: no compile, and a build lock left by a killed process cannot hang the start."""

from __future__ import annotations

import subprocess
import sys

from tests.launch_helpers import REPO, child_env

SCRIPT = r"""
from pretrain.runtime.distributed import init_runtime
init_runtime()
import sys
backend = sys.modules["deepspeed.comm.comm"].cdb  # DeepSpeed's started backend
print("op", type(backend).__name__, backend.shm_comm_op, flush=True)
"""


def test_the_cpu_start_builds_no_shm_op_and_ignores_a_stale_build_lock(tmp_path):
    extensions = tmp_path / "torch_extensions"
    stale = extensions / "deepspeed_shm_comm" / "lock"
    stale.parent.mkdir(parents=True)
    stale.touch()  # what a process killed while building the op leaves: torch waits for it forever
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=180,
                          env=child_env(TORCH_EXTENSIONS_DIR=str(extensions)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "op TorchBackend None"
    assert sorted(p.name for p in stale.parent.iterdir()) == ["lock"]  # nothing was built there
