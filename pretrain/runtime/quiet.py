"""Third-party start-up messages that say nothing a user can act on, silenced where the runtime starts.

``silence_known_warnings()`` runs when ``pretrain.model`` or ``pretrain.runtime.distributed`` is
imported (before megatron-core or DeepSpeed are: their warnings fire at import time; the samplers
and the chat reach megatron-core through the models before the runtime starts). Each entry says which message
it drops and why that message is harmless here; anything else still shows. (DeepSpeed's one stdout
line at its process-group start, "... deepspeed_shm_comm_op built successfully", is gone with the
op: ``pretrain.runtime.shm_op``.)
"""

from __future__ import annotations

import sys
import warnings

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


# Harmless only without a GPU: on CUDA they are advice worth reading, and stay.
CPU_ONLY_WARNINGS = (
    (UserWarning, r"When using (sequence parallelism|async grad allreduce) it is recommended to set the "
     r"environment variable CUDA_DEVICE_MAX_CONNECTIONS",
     "megatron-core's tensor-parallel layers, once per rank: the variable orders CUDA streams so that "
     "their collectives overlap the matrix products; a CPU run has no streams"),
)


def silence_known_warnings() -> None:
    """Ignore exactly the ``KNOWN_WARNINGS``, and ``CPU_ONLY_WARNINGS`` where torch is imported and
    sees no GPU (idempotent: ``filterwarnings`` replaces equal entries).

    torch is not imported here: a tool that only reads recipes (``pretrain.recipe`` imports
    ``pretrain.model``) must neither pay for it nor probe CUDA. The runtime calls this again once
    torch is in; the warnings of ``CPU_ONLY_WARNINGS`` come from training only."""
    known = KNOWN_WARNINGS
    torch = sys.modules.get("torch")
    if torch is not None and not torch.cuda.is_available():
        known += CPU_ONLY_WARNINGS
    for category, message, _why in known:
        warnings.filterwarnings("ignore", message=message, category=category)
