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

import torch

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


def _prepare_environment() -> None:
    """Fill in a world of one when no launcher set the rendezvous variables."""
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
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", verbose=False,
                                   timeout=timedelta(minutes=timeout_minutes))
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
