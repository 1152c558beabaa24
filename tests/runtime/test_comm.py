"""``Collectives`` moves what it reduces to the communication device and hands the result back where
the caller had it (the CPU bookkeeping tensors of a step under NCCL); without a process group every
collective is the identity."""

from __future__ import annotations

import pytest
import torch

from pretrain.runtime import comm
from pretrain.runtime.comm import Collectives


class FakeTensor:
    """Just enough of a tensor to follow where a collective puts it."""

    def __init__(self, device: str, value: float) -> None:
        self.device, self.value = torch.device(device), value

    def to(self, device):
        return FakeTensor(str(device), self.value)

    def contiguous(self):
        return self


@pytest.fixture
def world_of_two(monkeypatch):
    seen = []

    def all_reduce(tensor, op=None, group=None):
        seen.append(("all_reduce", tensor.device.type))
        tensor.value *= 2  # the other rank holds the same value

    def broadcast(tensor, src, group=None):
        seen.append(("broadcast", tensor.device.type))

    monkeypatch.setattr(comm.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(comm.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(comm.dist, "broadcast", broadcast)
    return seen


def test_a_host_tensor_is_reduced_on_the_communication_device_and_comes_back(world_of_two):
    nccl = Collectives(torch.device("cuda", 0))
    host = FakeTensor("cpu", 3.0)
    out = nccl.all_reduce(host)
    assert world_of_two == [("all_reduce", "cuda")]
    assert out.device.type == "cpu" and out.value == 6.0
    nccl.broadcast(FakeTensor("cpu", 1.0), src=0)
    assert world_of_two[-1] == ("broadcast", "cuda")


def test_a_tensor_already_on_the_device_is_reduced_in_place(world_of_two):
    gloo = Collectives(torch.device("cpu"))
    host = FakeTensor("cpu", 3.0)
    assert gloo.all_reduce(host) is host and host.value == 6.0
    assert world_of_two == [("all_reduce", "cpu")]


def test_without_a_process_group_collectives_are_the_identity(monkeypatch):
    monkeypatch.setattr(comm.dist, "is_initialized", lambda: False)
    c = Collectives(torch.device("cpu"))
    x = torch.tensor([1.0, 2.0])
    assert c.all_reduce(x) is x and c.broadcast(x, src=0) is x
    assert c.any_true(True) and not c.any_true(False)
    assert c.all_gather_object({"a": 1}) == [{"a": 1}]


@pytest.mark.gpu
def test_nccl_reduces_a_cpu_tensor_in_a_world_of_one(runtime):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    assert runtime.comm.device.type == "cuda"
    out = runtime.comm.all_reduce(torch.tensor([1.5, 2.5], dtype=torch.float64), group=runtime.dp_group)
    assert out.device.type == "cpu" and out.tolist() == [1.5, 2.5]
    assert runtime.comm.any_true(True)
