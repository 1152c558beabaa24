"""Which implementation a kernel call takes: the Triton kernel, the compiled reference, or the reference.

One process-wide switch, set once by the trainer from the recipe (``train.kernels`` ->
``set_kernel_backend``):

==============  =================================================================================
``"auto"``      For CUDA tensors when triton imports: what :data:`CUDA_CHOICE` names for the op
                (the Triton kernel, or ``torch.compile`` of its reference); the reference otherwise
                (the default).
``"triton"``    Triton always. CUDA tensors are compiled; CPU tensors run in Triton's interpreter,
                which must be asked for explicitly with ``TRITON_INTERPRET=1`` (it is orders of
                magnitude slower; the tests use it). Anything else raises instead of silently
                falling back, so a recipe that asks for the kernels gets them or fails loudly.
``"reference"`` The PyTorch reference everywhere (debugging, parity checks, CPU runs).
==============  =================================================================================

Every public op in this package asks :func:`kernel_impl` with its name and main input and takes one
of the three paths; they share signatures, dtypes and state-dict layouts.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch

from ._triton import HAVE_TRITON, interpreter_enabled

BACKENDS = ("auto", "triton", "reference")
IMPLS = ("triton", "compile", "reference")

# What "auto" runs on CUDA, op by op: "triton" (the fused kernel) or "compile" (torch.compile of the
# op's PyTorch reference). The GPU check's kernels phase (benchmarks/kernels_bench.py) times both on
# the 1.3B shapes and names every op whose kernel is slower than the compiled reference; switching
# such an op is this one line. Untimed ops stay on Triton.
CUDA_CHOICE: dict[str, str] = {
    "rms_norm": "triton",
    "grn": "triton",
    "modulate": "triton",
    "flow_interpolate": "triton",
    "rf_loss": "triton",
    "cfg_euler_step": "triton",
    "repa_cosine": "triton",
}

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
    """True when the backend lets ops on ``tensor`` leave the plain reference (the ConvNeXt block
    asks this once for its whole fused forward; each op then asks :func:`kernel_impl`).

    Raises ``RuntimeError`` when the backend is forced to ``"triton"`` but the kernel cannot run
    (triton missing, or a CPU tensor without ``TRITON_INTERPRET=1``).
    """
    if _backend == "reference":
        return False
    if _backend == "auto":
        return tensor.is_cuda and HAVE_TRITON and not interpreter_enabled()
    if not HAVE_TRITON:
        raise RuntimeError("kernel backend 'triton' was requested but triton is not installed: "
                           "pip install triton (CUDA builds of torch bring it), or train.kernels=auto")
    if tensor.is_cuda or interpreter_enabled():
        return True
    raise RuntimeError(
        f"kernel backend 'triton' (train.kernels=triton) was requested for a tensor on {tensor.device}; "
        "Triton compiles for CUDA only. Set TRITON_INTERPRET=1 to run the kernels in Triton's (slow) "
        "interpreter, or use the 'auto' or 'reference' backend (train.kernels=auto)"
    )


def kernel_impl(op: str, tensor: torch.Tensor) -> str:
    """``"triton"``, ``"compile"`` or ``"reference"``: what ``op`` (a key of :data:`CUDA_CHOICE`) runs on
    ``tensor`` under the current backend. Raises as :func:`use_triton` does."""
    choice = CUDA_CHOICE.get(op)
    if choice not in ("triton", "compile"):
        raise KeyError(f"kernel op {op!r}: CUDA_CHOICE must map it to 'triton' or 'compile', got {choice!r}")
    if not use_triton(tensor):
        return "reference"
    return choice if _backend == "auto" else "triton"


_COMPILED: dict[str, Callable] = {}


def reference_for(op: str, tensor: torch.Tensor, reference: Callable, fits: bool = True) -> Optional[Callable]:
    """``None`` when ``op`` runs its Triton kernel on ``tensor``; otherwise the callable to run instead:
    ``reference`` itself, or (where :data:`CUDA_CHOICE` says ``"compile"``) its ``torch.compile``, built
    once per op. ``fits=False`` (a shape the kernel does not take) always gives the plain reference."""
    impl = kernel_impl(op, tensor) if fits else "reference"
    if impl == "triton":
        return None
    if impl == "reference":
        return reference
    compiled = _COMPILED.get(op)
    if compiled is None:
        compiled = _COMPILED[op] = torch.compile(reference)
    return compiled


def refuse_create_graph(op: str) -> None:
    """Called first in every kernel's backward. The kernels' backward builds no autograd graph, so under
    ``create_graph=True`` (grad mode is on in backward only then) the gradient it returns would carry no
    derivative of its own, and a higher-order gradient (a gradient penalty) would silently miss that
    term. Raise instead."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}: the Triton kernel's backward is not differentiable (create_graph=True / double "
            "backward). Use the 'reference' kernel backend (train.kernels=reference, or "
            "fused_kernels.kernel_backend('reference')) for higher-order gradients"
        )
