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
from dataclasses import dataclass

import torch

from . import cuda_shim


@dataclass(frozen=True)
class Runtime:
    """Where this process sits in the parallel layout (ranks are within each group)."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    device: torch.device

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def _free_port() -> int:
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
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    # DeepSpeed JIT-builds small ops (the CPU shared-memory all-reduce) into torch's extension
    # cache; a cache shared between virtual environments makes each one rebuild them every start.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    if not torch.cuda.is_available():
        # DeepSpeed picks its accelerator when first imported: it must see this before that.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init_runtime(tensor_parallel: int = 1, pipeline_parallel: int = 1, seed: int = 1234) -> Runtime:
    """Initialise every process group once and seed all generators identically on every DP replica.

    The same ``seed`` on every rank gives data-parallel replicas identical initial weights (megatron
    initialises the full matrices on CPU and slices them, so the tensor-parallel layout does not
    change them either).
    """
    _prepare_environment()
    cuda_shim.install_if_needed()
    import deepspeed
    from megatron.core import parallel_state, tensor_parallel as mcore_tp

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", verbose=False)
    world_size = torch.distributed.get_world_size()
    if world_size % (tensor_parallel * pipeline_parallel):
        raise ValueError(
            f"parallel layout: tensor_parallel={tensor_parallel} x pipeline_parallel="
            f"{pipeline_parallel} does not divide the world size {world_size}"
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel
        )
    torch.manual_seed(seed)
    mcore_tp.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)  # the shim maps megatron's device seeding onto the CPU generator
    return current_runtime()


def current_runtime() -> Runtime:
    from megatron.core import parallel_state as ps

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return Runtime(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        device=device,
    )


def shutdown_runtime() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
