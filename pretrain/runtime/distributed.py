"""The one place that starts the distributed runtime: torch.distributed, megatron-core's
parallel_state and DeepSpeed's accelerator.

NCCL on CUDA, gloo on CPU (with ``DS_ACCELERATOR=cpu`` and the CPU shim for megatron-core). A plain
``python`` run without launcher variables becomes a world of one, so tests and notebooks use the
same path as ``deepspeed``/``torchrun``/SLURM launches.
"""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta
from typing import Optional

import torch

from ..model.config import ConfigError
from . import cuda_shim
from .layout import ParallelLayout
from .quiet import silence_known_warnings
from .shm_op import skip_cpu_shm_op

# Before megatron-core and DeepSpeed are imported: their harmless start-up warnings fire at import.
silence_known_warnings()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LaunchError(ConfigError):
    """A launcher variable (``RANK``, ``WORLD_SIZE``, ``MASTER_PORT``, ...) is wrong or missing. Each
    process reads its own environment, so the process that finds it says it (``pretrain.main``)."""

    all_ranks = False


# What torchrun, deepspeed and launch.sh set for every process (MASTER_ADDR/MASTER_PORT may also be
# given alone to a world of one). DeepSpeed needs all five or it goes looking for MPI (mpi4py).
_LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_DO = "set them as a launcher does (torchrun, deepspeed, launch.sh), or unset all five for a world of one"


def _env_int(name: str, minimum: int) -> int:
    raw = os.environ[name]
    try:
        value = int(raw)
    except ValueError:
        raise LaunchError(f"{name}: not a whole number ({raw!r}); {_DO}") from None
    if value < minimum:
        raise LaunchError(f"{name}: must be at least {minimum}, got {value}; {_DO}")
    return value


# The launch variables last checked and found good. pretrain.main checks them before DeepSpeed is
# imported and init_runtime (which tests and the samplers call directly) checks again: the second
# check of unchanged values would only repeat MASTER_ADDR's name lookup.
_checked_environment: Optional[tuple] = None


def _launch_values() -> tuple:
    return tuple(os.environ.get(name) for name in (*_LAUNCH_VARS, "DS_ACCELERATOR"))


def check_launch_environment() -> tuple[int, int]:
    """Check the launcher's variables before anything reads them; return ``(rank, world_size)``
    (``(0, 1)`` for a plain run, which ``_prepare_environment`` makes a world of one).

    Raises ``LaunchError`` with one line naming the variable. Why here: torch and DeepSpeed read
    them with bare ``int()`` (tracebacks), a ``RANK`` outside the world or a ``MASTER_ADDR`` that
    does not resolve waits out the whole rendezvous timeout, and a partial set sends DeepSpeed to MPI.
    """
    launcher = [name for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE") if name in os.environ]
    missing = [name for name in _LAUNCH_VARS if name not in os.environ]
    if launcher and missing:  # e.g. WORLD_SIZE copied without RANK: rank 0 would wait for the others
        raise LaunchError(f"{', '.join(missing)}: not set, but {', '.join(launcher)} "
                          f"{'is' if len(launcher) == 1 else 'are'}; {_DO}")
    rank, world_size = 0, 1
    if launcher:
        world_size = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        local_rank = _env_int("LOCAL_RANK", 0)
        if rank >= world_size:  # it would wait for a rendezvous that never completes
            raise LaunchError(f"RANK: {rank} is not below WORLD_SIZE={world_size} (ranks are 0 .. "
                              f"{world_size - 1}); {_DO}")
        if local_rank >= world_size:
            raise LaunchError(f"LOCAL_RANK: {local_rank} is not below WORLD_SIZE={world_size}; {_DO}")
        if torch.cuda.is_available() and local_rank >= torch.cuda.device_count():  # set_device's traceback
            raise LaunchError(f"LOCAL_RANK: {local_rank}, but this machine has {torch.cuda.device_count()} "
                              f"GPU(s); start at most one process per GPU (CUDA_VISIBLE_DEVICES)")
    if "MASTER_PORT" in os.environ:
        port = _env_int("MASTER_PORT", 0)
        if port > 65535 or (port == 0 and world_size > 1):  # 0: any free port, which no other rank can find
            raise LaunchError(f"MASTER_PORT: {port} is not a port number (1 .. 65535); {_DO}")
    if "MASTER_ADDR" in os.environ:
        addr = os.environ["MASTER_ADDR"]
        try:  # torch retries a name that does not resolve until the rendezvous timeout
            socket.getaddrinfo(addr, None)
        except (socket.gaierror, UnicodeError) as err:
            if getattr(err, "errno", None) != socket.EAI_AGAIN:  # a temporary DNS failure: torch retries it
                raise LaunchError(f"MASTER_ADDR: cannot resolve {addr!r} ({getattr(err, 'strerror', None) or err}); "
                                  "give rank 0's host name or address, e.g. 127.0.0.1 on one machine") from None
    accelerator = os.environ.get("DS_ACCELERATOR")
    if accelerator is not None and accelerator not in ("cpu", "cuda"):  # DeepSpeed's ValueError at import
        raise LaunchError(f"DS_ACCELERATOR: {accelerator!r} is not cpu or cuda, the accelerators this runtime "
                          "starts; unset it (cuda where torch sees a GPU, else cpu)")
    if accelerator == "cuda" and not torch.cuda.is_available():  # a traceback at the model's .to("cuda")
        raise LaunchError("DS_ACCELERATOR: cuda, but torch sees no CUDA device here; unset it or set "
                          "DS_ACCELERATOR=cpu to train on the CPU")
    global _checked_environment
    _checked_environment = _launch_values()
    return rank, world_size


def _prepare_environment() -> None:
    """Check the launcher's variables; fill in a world of one when no launcher set them."""
    if _checked_environment != _launch_values():
        check_launch_environment()
    if "RANK" not in os.environ:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    # DeepSpeed JIT-builds small ops (the CPU shared-memory all-reduce) into torch's extension
    # cache; a cache shared between virtual environments makes each one rebuild them every start.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    if not torch.cuda.is_available():
        # DeepSpeed picks its accelerator when first imported: it must see this before that.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _rendezvous_error(err: Exception, timeout_minutes: int) -> LaunchError:
    """One line for a failed rendezvous (torch's TCP store at MASTER_ADDR:MASTER_PORT)."""
    addr, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "EADDRINUSE" in reason:  # rank 0 hosts the store: another process holds the port
        return LaunchError(f"MASTER_PORT: {port} is in use on this machine ({reason}); pick a free port, or "
                           "launch with torchrun --standalone, which picks one")
    if "timed out" in reason.lower():  # a rank never started, or the ranks were given different addresses
        return LaunchError(f"rendezvous at {addr}:{port}: the WORLD_SIZE={os.environ['WORLD_SIZE']} processes did "
                           f"not all meet within {timeout_minutes} minute(s) ({reason}); start every rank, all "
                           "with the same MASTER_ADDR and MASTER_PORT")
    return LaunchError(f"rendezvous at {addr}:{port} failed ({reason}); check MASTER_ADDR and MASTER_PORT")


def init_runtime(tensor_parallel: int = 1, pipeline_parallel: int = 1, seed: int = 1234,
                 timeout_minutes: int = 30) -> ParallelLayout:
    """Initialise every process group once and seed all generators identically on every DP replica.

    The same ``seed`` on every rank gives data-parallel replicas identical initial weights (megatron
    initialises the full matrices on CPU and slices them, so the tensor-parallel layout does not
    change them either). ``timeout_minutes``: how long any collective of any process group may wait
    before it fails (a stopped rank must not block the others for megatron's default half hour).
    """
    _prepare_environment()
    cuda_shim.install_if_needed()
    import deepspeed
    from megatron.core import parallel_state, tensor_parallel as mcore_tp

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        if not use_cuda:
            skip_cpu_shm_op()  # an op this project never calls: 58 s of compiling and a hang risk
        try:
            deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", verbose=False,
                                       timeout=timedelta(minutes=timeout_minutes))
        except torch.distributed.DistError as err:  # was a traceback ending in torch's message
            raise _rendezvous_error(err, timeout_minutes) from None
    world_size = torch.distributed.get_world_size()
    if world_size % (tensor_parallel * pipeline_parallel):
        raise ValueError(
            f"parallel layout: tensor_parallel={tensor_parallel} x pipeline_parallel="
            f"{pipeline_parallel} does not divide the world size {world_size}"
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel,
            distributed_timeout_minutes=timeout_minutes,
        )
    torch.manual_seed(seed)
    mcore_tp.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)  # the shim maps megatron's device seeding onto the CPU generator
    return current_layout()


def current_layout() -> ParallelLayout:
    """This process's ``ParallelLayout``, read from megatron-core's process groups (built once by
    ``init_runtime``; pass the result down rather than calling this again)."""
    from megatron.core import parallel_state as ps

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    return ParallelLayout(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        device=device,
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        cp_group=ps.get_context_parallel_group(),
        prev_rank=None if first else ps.get_pipeline_model_parallel_prev_rank(),
        next_rank=None if last else ps.get_pipeline_model_parallel_next_rank(),
        last_stage_rank=ps.get_pipeline_model_parallel_last_rank(),
    )


def shutdown_runtime() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
