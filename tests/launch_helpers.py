"""Starting child Python processes from tests (torchrun workers, CLI runs)."""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Set by the in-process runtime fixture (a world of one): a child must not join that rendezvous.
_RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS}
    env.update(PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def torchrun_cmd(nproc: int, script: Path, *args: str) -> list[str]:
    # --standalone lets the rendezvous bind a free port itself: a port picked here beforehand can be
    # taken by another process before torchrun binds it.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(script), *args]
