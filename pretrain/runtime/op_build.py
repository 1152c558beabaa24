"""DeepSpeed's CPU communication op, loaded so that a killed build cannot hang later starts.

On the CPU, DeepSpeed JIT-builds its shared-memory all-reduce (``deepspeed_shm_comm``) with
``torch.utils.cpp_extension`` when the process group starts, and every later start loads it from
the extension cache. torch guards the build folder with a bare ``lock`` file, created before the
build and removed after it; a process that waits for the file polls for it with no time limit. A
process killed while it held the file (Ctrl-C during the first start of ``make demo``, a pre-emption
or a test's timeout at start-up) leaves it behind, and from then on every start of every rank waits
for it forever, printing nothing.

``load_cpu_comm_op`` loads the op first, under an advisory ``flock`` on a file of its own next to the
build folder. The kernel drops an ``flock`` when its holder dies, so a ``lock`` file found while
holding it belongs to no live build started through this function: it is removed, with one line
naming it. DeepSpeed's own load at the process-group start then returns the module loaded here (its
op builders keep loaded ops per process). A process that builds the op outside this function (a
plain ``deepspeed`` script pointed at the same extension folder) does not take the ``flock``; this
project gives each environment its own folder (``TORCH_EXTENSIONS_DIR`` under ``sys.prefix``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from pathlib import Path
from typing import Iterator

OP_BUILDER = "ShareMemCommBuilder"


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path``; yields False where the filesystem has no ``flock``."""
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # e.g. a Lustre mount without the flock option
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_cpu_comm_op() -> bool:
    """Load DeepSpeed's shared-memory communication op if its accelerator has one (the CPU's).

    Returns whether it was loaded here. Needs ``TORCH_EXTENSIONS_DIR`` set (the runtime sets it).
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(OP_BUILDER)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return False
    root = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f".{builder.NAME}.flock") as held:
        stale = root / builder.NAME / "lock"
        if held and stale.exists():
            print(f"[runtime] removing {stale}: left by a process killed while it built DeepSpeed's "
                  f"{builder.NAME} op (torch waits for that file forever otherwise)", file=sys.stderr, flush=True)
            stale.unlink(missing_ok=True)
        builder.load(verbose=False)
    return True
