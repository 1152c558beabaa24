"""Third-party start-up messages that say nothing a user can act on, silenced where the runtime starts.

``silence_known_warnings()`` runs when ``pretrain.runtime.distributed`` is imported (before
megatron-core or DeepSpeed are: their warnings fire at import time), and ``quiet_stdout`` wraps
DeepSpeed's process-group start. Each entry says which message it drops and why that message is
harmless here; anything else still shows.
"""

from __future__ import annotations

import contextlib
import io
import sys
import warnings
from typing import Iterator

# (category, message regex (matched at the start), why it is harmless)
KNOWN_WARNINGS = (
    (UserWarning, r"Transformer Engine and Apex are not installed",
     "megatron-core falls back to its local multi-tensor helpers and torch optimizers; this project "
     "uses DeepSpeed's optimizer and never those fused paths"),
    (UserWarning, r"Apex is not installed\. Falling back to Torch Norm",
     "the LLM's norms are torch's (the layer spec this project builds asks for them)"),
    (UserWarning, r"full scope is deprecated",
     "megatron-core's TransformerConfig default for CUDA graph capture; this project captures no CUDA graphs"),
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
     "DeepSpeed's ZeRO gathers call the old name; it is an alias of the same collective in this torch"),
)

# Whole stdout lines printed (not warned) by DeepSpeed when it starts its process group.
KNOWN_STDOUT_LINES = (
    # deepspeed/comm/torch.py prints this each start where it builds or loads the op; the runtime
    # skips the op on the CPU (pretrain.runtime.shm_op), so this stays for a backend started elsewhere
    "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
)


def silence_known_warnings() -> None:
    """Ignore exactly the ``KNOWN_WARNINGS`` (idempotent: ``filterwarnings`` replaces equal entries)."""
    for category, message, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Inside the block, stdout is held back; afterwards every line except ``KNOWN_STDOUT_LINES``
    is printed (so an unexpected message is delayed, never lost)."""
    held = io.StringIO()
    try:
        with contextlib.redirect_stdout(held):
            yield
    finally:
        kept = [line for line in held.getvalue().splitlines(keepends=True)
                if line.rstrip("\n") not in KNOWN_STDOUT_LINES]
        sys.stdout.write("".join(kept))
