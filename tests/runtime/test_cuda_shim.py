"""The CPU shim for megatron-core: active only without CUDA, confined to one module, RNG forks work."""

from pathlib import Path

import pytest
import torch

from pretrain.runtime import cuda_shim

REPO = Path(__file__).resolve().parents[2]


def test_shim_is_inert_when_cuda_is_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cuda_shim.install_if_needed() is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is only installed on CPU-only hosts")
def test_megatron_rng_tracker_forks_the_cpu_generator(runtime):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    assert torch.cuda.current_device() == "cpu"
    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        inside = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before), "the fork must restore the default generator"
    assert not torch.equal(inside, torch.rand(4)), "the tracker's stream differs from the default one"


def test_only_the_runtime_knows_about_the_shim():
    users = [
        p.relative_to(REPO).as_posix()
        for folder in ("pretrain", "data_tools", "fused_kernels")
        for p in (REPO / folder).rglob("*.py")
        if "cuda_shim" in p.read_text() and p.name != "cuda_shim.py"
    ]
    assert users == ["pretrain/runtime/distributed.py"]
