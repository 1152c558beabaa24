"""Every collective of the project goes through here: one owner of the communication device.

Why one module: NCCL (the backend on CUDA) only moves CUDA tensors, and the step's bookkeeping
(unit counts, logged losses, the stop flag) naturally lives on the CPU. A raw
``torch.distributed.all_reduce`` of a CPU tensor works in every CPU test (gloo) and dies on the
first GPU step. ``Collectives`` moves a tensor to the communication device when it is elsewhere and
hands the result back where the caller had it, so call sites never think about backends; a test
(``tests/runtime/test_collectives_structure.py``) fails when a raw collective appears anywhere else.

Decision: no mixed ``cpu:gloo,cuda:nccl`` default group. It would let CPU tensors through NCCL
runs silently, but each of those collectives is then a host-side round trip hidden at its call
site, and every process group would carry two communicators (twice the set-up, two timeout
regimes). Moving the few small bookkeeping tensors explicitly keeps the host round trips
countable, at this one place, and on the same stream as the training collectives.

Without an initialised process group (unit tests that build a model in one process) every
collective is the identity, which is what a world of one computes.
"""

from __future__ import annotations


import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class Collectives:
    """Collectives on ``device`` (``cuda:N`` under NCCL, ``cpu`` under gloo).

    Every method takes an optional ``group`` (a process group of the ``ParallelLayout``; None is the
    whole world) and returns the result: the same tensor when it already lived on the communication
    device (reduced in place), otherwise a new tensor on the caller's device.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)

    @staticmethod
    def active() -> bool:
        return dist.is_available() and dist.is_initialized()

    def _on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if tensor.device == self.device else tensor.to(self.device)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
        if not self.active():
            return tensor
        work = self._on_device(tensor)
        dist.all_reduce(work, op=_OPS[op], group=group)
        return work if work is tensor else work.to(tensor.device)

    def broadcast(self, tensor: torch.Tensor, src: int, group=None) -> torch.Tensor:
        """``src`` is a global rank."""
        if not self.active():
            return tensor
        work = self._on_device(tensor)
        dist.broadcast(work, src=src, group=group)
        return work if work is tensor else work.to(tensor.device)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        dist.send(self._on_device(tensor).contiguous(), dst=dst)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        work = self._on_device(tensor)
        dist.recv(work, src=src)
        return work if work is tensor else work.to(tensor.device)

    def barrier(self, group=None) -> None:
        if not self.active():
            return
        if self.device.type == "cuda":
            # NCCL's barrier otherwise guesses a device from the rank, which is wrong when ranks do
            # not map one to one onto local GPUs.
            dist.barrier(group=group, device_ids=[self.device.index])
        else:
            dist.barrier(group=group)

    def max_int(self, value: int, group=None) -> int:
        """The largest of every rank's small integer (one small all-reduce, one host read)."""
        work = torch.tensor([value], dtype=torch.int64, device=self.device)
        return int(self.all_reduce(work, op="max", group=group).item())

    def any_true(self, flag: bool, group=None) -> bool:
        """True on every rank when ``flag`` is True on any rank."""
        return self.max_int(1 if flag else 0, group=group) > 0

    def all_gather_object(self, obj, group=None) -> list:
        """Small Python objects from every rank of ``group`` (checkpoint manifests, errors)."""
        if not self.active():
            return [obj]
        out: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, obj, group=group)
        return out


def local_collectives() -> Collectives:
    """Collectives for code that runs without a layout (a world of one, or tools)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return Collectives(device)


__all__ = ["Collectives", "local_collectives"]
