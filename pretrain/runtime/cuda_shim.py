"""CPU stand-ins for the few ``torch.cuda`` entry points megatron-core calls unconditionally.

megatron-core has no CPU code path: it allocates buffers on ``torch.cuda.current_device()``, seeds
``torch.cuda`` and forks the CUDA RNG around dropout. On a host without CUDA those calls raise. This
module redirects exactly those entry points to their CPU equivalents so the same model code runs in
CPU tests and on laptops. It is the only place in the code base that knows about it, and
``install_if_needed`` does nothing when CUDA is present.

What is patched and why:
- ``torch.cuda.current_device`` -> ``"cpu"``: megatron uses the result as a ``device=`` argument.
- ``torch.cuda.set_device`` / ``device_count``: a no-op / 0.
- ``torch.cuda.manual_seed(_all)``: seeds the CPU generator (megatron seeds its tracker this way).
- CUDA RNG state get/set (torch's and megatron's private copies): the CPU generator's state, so
  megatron's RNG tracker forks and restores a real generator.
"""

from __future__ import annotations

import torch

_installed = False


def _cpu_get_rng_state(*_args, **_kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, *_args, **_kwargs) -> None:
    torch.set_rng_state(new_state)


def install_if_needed() -> bool:
    """Install the CPU stand-ins when CUDA is absent. Returns True when the shim is active."""
    global _installed
    if torch.cuda.is_available():
        return False
    if _installed:
        return True

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.set_device = lambda *_a, **_k: None
    torch.cuda.device_count = lambda: 0
    # megatron's RNG tracker seeds "the device generator" and reads its state back: on CPU that
    # generator is the CPU one, and the tracker restores the original state after each fork.
    # (torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.)
    torch.cuda.manual_seed = torch.default_generator.manual_seed
    torch.cuda.manual_seed_all = lambda seed: None
    torch.cuda.get_rng_state = _cpu_get_rng_state
    torch.cuda.set_rng_state = _cpu_set_rng_state
    torch.cuda.random.get_rng_state = _cpu_get_rng_state
    torch.cuda.random.set_rng_state = _cpu_set_rng_state

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = _cpu_get_rng_state
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state
    _installed = True
    return True
