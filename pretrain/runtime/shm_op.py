"""DeepSpeed's CPU shared-memory all-reduce op: never used here, so never built.

On the CPU accelerator, DeepSpeed's process-group start (``deepspeed.comm.torch.TorchBackend``)
JIT-builds a C++ op, ``deepspeed_shm_comm``, with ``torch.utils.cpp_extension`` and initialises its
shared-memory buffers. The op serves ``deepspeed.comm.inference_all_reduce`` alone, which only
DeepSpeed's inference-time tensor parallelism (``module_inject``) calls; this project's collectives
are torch.distributed's (gloo on the CPU), through ``pretrain.runtime.comm``, and its tensor
parallelism is megatron-core's. Building it costs:

* about 58 s of compiling on the first start of a fresh environment (ninja's log; ``make demo``'s
  first run and every CI run pay it);
* a hang: torch guards the build with a bare ``lock`` file and waits for it with no time limit, so a
  process killed during that first build (Ctrl-C, a pre-emption, a test's timeout) left every later
  start of every rank, sampler and demo waiting forever, silently (seen on this project's demo, and
  reproduced: a start with such a file was still waiting after 60 s);
* per DeepSpeed's own comment, a fault where the CPU lacks the kernel's vector ISA.

``skip_cpu_shm_op()`` replaces DeepSpeed's ``build_shm_op`` (deepspeed 0.19, pinned) with one that
returns None, which is what DeepSpeed itself does where the op is not compatible: the backend then
keeps no op, and ``inference_all_reduce`` falls back to ``torch.distributed.all_reduce``.
"""

from __future__ import annotations

import importlib


def _no_shm_op() -> None:
    return None


def skip_cpu_shm_op() -> None:
    """Before ``deepspeed.init_distributed`` on the CPU: start DeepSpeed's backend without the op."""
    # importlib, not ``import deepspeed.comm.torch as ...``: the package's ``torch`` attribute is torch itself
    backend_module = importlib.import_module("deepspeed.comm.torch")
    backend_module.build_shm_op = _no_shm_op
