"""Starting child Python processes from tests (torchrun workers, CLI runs), and ``pretrain.main`` in the
test process for a world of one."""

import contextlib
import json
import os
import subprocess
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


def run_main(nproc: int, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    """``pretrain.main`` with ``args`` from the repository root: torchrun with ``nproc`` processes, or
    for a world of one this process (``main_in_process``; ``timeout`` is then pytest's)."""
    if nproc == 1:
        return main_in_process(*args)
    return subprocess.run(torchrun_cmd(nproc, REPO / "pretrain" / "main.py", *args), cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def as_a_child():
    """Run code in this process as a child started with ``child_env`` would run it: from the
    repository root, on one thread, with the project's warning filters and its own SIGTERM/SIGUSR1
    handlers (this process's threads, filters and handlers come back after), in this worker's world
    of one. That world is started once and left running (as the session's ``runtime`` fixture
    does): starting and destroying one per run would leak its sockets and reuse a port that another
    worker's launch may have taken since."""
    import signal
    import warnings

    import torch

    from pretrain.runtime.distributed import init_runtime
    from pretrain.runtime.quiet import silence_known_warnings

    init_runtime(seed=1234)  # a no-op but for the seed once running; whoever runs next seeds again
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # child_env's OMP_NUM_THREADS=1: the same reduction order as a child
    try:
        with contextlib.chdir(REPO), warnings.catch_warnings():
            silence_known_warnings()  # a child has them from its imports; pytest resets this process's
            yield
    finally:
        torch.set_num_threads(threads)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def main_in_process(*args: str) -> subprocess.CompletedProcess:
    """``pretrain.main`` in this process (``as_a_child``). Its output and exit code come back as from
    ``subprocess.run``; an exception is exit code 1 with its traceback on stderr.

    Why: a child spends about 6 s of its 7 s importing torch, transformers, megatron-core and
    DeepSpeed, which this process has done once. The training is the same code on the same thread
    count: the metrics of a tiny run were bit-identical to a child's. What only a process shows
    (everything that reaches the console, warnings at import included; signals; the exit status
    of the interpreter) is tested with child processes."""
    import io
    import traceback

    from pretrain.main import main

    out, err = io.StringIO(), io.StringIO()
    with as_a_child(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse's: an int, or None (0) as the interpreter reads it
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        except Exception:
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(["pretrain.main", *args], code, out.getvalue(), err.getvalue())


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
