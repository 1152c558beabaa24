"""Starting child Python processes from tests (torchrun workers, CLI runs)."""

import json
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


def copy_run_at(run: Path, dst: Path, step: int) -> Path:
    """``dst``: the run folder ``run`` as it stood right after it saved step ``step`` (that checkpoint as
    ``latest``, no later one, the metrics up to ``step``). A launch into it resumes the run from that
    checkpoint as after a crash or a pre-emption, without paying for a second launch that trains up to
    ``step``; the uninterrupted run's later steps are the reference the resumed ones must equal."""
    import shutil

    tag = f"step_{step:08d}"
    ckpt = run / "checkpoints"
    assert (ckpt / tag / "COMPLETE").exists(), f"{run} kept no complete checkpoint {tag} (save_interval, keep_last?)"
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt / tag, dst / "checkpoints" / tag)
    (dst / "checkpoints" / "latest").write_text(tag)
    shutil.copy2(run / "recipe.yaml", dst / "recipe.yaml")
    rows = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (dst / "metrics.jsonl").write_text("".join(r for r in rows if json.loads(r)["step"] <= step))
    return dst
