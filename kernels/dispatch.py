"""Which implementation a kernel call takes: the Triton kernel or the PyTorch reference.

One process-wide switch, set once by the trainer from the recipe (``set_kernel_backend``):

==============  =================================================================================
``"auto"``      Triton for CUDA tensors when triton imports, the reference otherwise (the default).
``"triton"``    Triton always. CUDA tensors are compiled; CPU tensors run in Triton's interpreter,
                which must be asked for explicitly with ``TRITON_INTERPRET=1`` (it is orders of
                magnitude slower; the tests use it). Anything else raises instead of silently
                falling back, so a recipe that asks for the kernels gets them or fails loudly.
``"reference"`` The PyTorch reference everywhere (debugging, parity checks, CPU runs).
==============  =================================================================================

Every public op in this package calls :func:`use_triton` with its main input and takes one path or
the other; the two paths share signatures, dtypes and state-dict layouts.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ._triton import HAVE_TRITON, interpreter_enabled

BACKENDS = ("auto", "triton", "reference")

_backend = "auto"


def set_kernel_backend(name: str) -> None:
    """Set the process-wide backend: ``"auto"``, ``"triton"`` or ``"reference"``."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_kernel_backend() -> str:
    return _backend


@contextlib.contextmanager
def kernel_backend(name: str) -> Iterator[None]:
    """Temporarily use another backend (tests, benchmarks): ``with kernel_backend("reference"): ...``."""
    previous = get_kernel_backend()
    set_kernel_backend(name)
    try:
        yield
    finally:
        set_kernel_backend(previous)


def triton_available() -> bool:
    return HAVE_TRITON


def use_triton(tensor: torch.Tensor) -> bool:
    """True when an op on ``tensor`` should run its Triton kernel under the current backend.

    Raises ``RuntimeError`` when the backend is forced to ``"triton"`` but the kernel cannot run
    (triton missing, or a CPU tensor without ``TRITON_INTERPRET=1``).
    """
    if _backend == "reference":
        return False
    if _backend == "auto":
        return tensor.is_cuda and HAVE_TRITON and not interpreter_enabled()
    if not HAVE_TRITON:
        raise RuntimeError("kernel backend 'triton' was requested but triton is not installed")
    if tensor.is_cuda or interpreter_enabled():
        return True
    raise RuntimeError(
        f"kernel backend 'triton' was requested for a tensor on {tensor.device}; Triton compiles for "
        "CUDA only. Set TRITON_INTERPRET=1 to run the kernels in Triton's (slow) interpreter, or use "
        "the 'auto' or 'reference' backend"
    )
