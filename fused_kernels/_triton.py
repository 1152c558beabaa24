"""Triton import guard and the launcher every kernel module uses.

``triton_kernel`` replaces ``@triton.jit``. The plain decorator decides between compiling and
interpreting once, when the module is imported, from ``TRITON_INTERPRET``; a test suite that imports
these modules before it sets the variable would then get compiled kernels that cannot run on CPU
tensors. Here the choice is made at each launch, from the tensors' device:

* CUDA tensors, ``TRITON_INTERPRET`` unset: the compiled kernel (``triton.runtime.JITFunction``);
* CPU tensors, or ``TRITON_INTERPRET=1``: Triton's numpy interpreter (slow; for tests).

Triton's own library functions (``tl.sum``, ``tl.zeros``, ...) are ``@jit`` functions too, fixed in
the same way when ``triton`` is first imported; an interpreted launch swaps the compiled ones for
interpreted twins for its duration (as the interpreter itself patches ``triton.language`` while it
runs) and afterwards restores ``triton.language`` attribute by attribute (the interpreter leaves
some of its patches behind). So the interpreter works whatever the import order, and compiling
still works in the same process after interpreting.

Interpreted launches mutate ``triton.language`` while they run (so does Triton's own interpreter):
they are for tests and debugging, not for concurrent use from several threads.

Whether a CPU tensor may take the Triton path at all is :func:`fused_kernels.dispatch.use_triton`'s call,
not this module's. Kernels must not call other ``@triton.jit`` functions (a compiled helper cannot be
called from an interpreted kernel); the kernels in this package are self-contained.

Without triton installed this module still imports: ``tl.constexpr`` annotations evaluate, and a
launch raises. ``fused_kernels.dispatch`` then never chooses the Triton path.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import Callable, Iterator

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # the CPU install (`bootstrap.sh run`) has no Triton; CUDA torch brings it
    triton = None
    HAVE_TRITON = False

    class _NoTritonLanguage:
        """Just enough of ``triton.language`` for kernel signatures to evaluate."""

        constexpr = None

    tl = _NoTritonLanguage()


def interpreter_enabled() -> bool:
    """``TRITON_INTERPRET`` as Triton reads it, looked up now (not at import)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes", "y")


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def num_programs_hint(device: torch.device) -> int:
    """Programs that keep the device busy: a few waves of SMs on CUDA, a handful when interpreting."""
    if device.type == "cuda" and not interpreter_enabled():
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


_INTERPRETED_TWINS: dict = {}


def _language_namespaces() -> list:
    """The modules and classes of ``triton.language`` that the interpreter patches while it runs."""
    core = tl.core
    found = [tl, core, tl.math, getattr(tl, "standard", None), getattr(tl, "random", None)]
    found += [getattr(core, name, None) for name in ("tensor", "dtype", "condition", "tensor_descriptor_base")]
    return [ns for ns in found if ns is not None]


@contextlib.contextmanager
def _interpreter_scope() -> Iterator[None]:
    """Run an interpreted launch with interpreted stdlib twins, then restore ``triton.language``.

    Two things to undo: the compiled-mode ``@jit`` library functions swapped for interpreted twins,
    and the interpreter's own patches. Its device-function calls (``tl.sum`` inside a kernel) patch
    ``triton.language.core`` without restoring it, which would break any later compilation in this
    process; so every attribute of the patched namespaces is put back as it was before the launch.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    namespaces = _language_namespaces()
    saved = [(ns, dict(vars(ns))) for ns in namespaces]
    try:
        for ns in namespaces:
            if not inspect.ismodule(ns):
                continue
            for name, obj in list(vars(ns).items()):
                if isinstance(obj, JITFunction) and not name.startswith("_"):
                    twin = _INTERPRETED_TWINS.get(id(obj))
                    if twin is None:
                        twin = _INTERPRETED_TWINS[id(obj)] = InterpretedFunction(obj.fn)
                    setattr(ns, name, twin)
        yield
    finally:
        for ns, attrs in saved:
            current = vars(ns)
            if not inspect.ismodule(ns):
                # a patch may have shadowed an inherited attribute; modules keep new names, which
                # the interpreter adds to the globals of the functions it rewrites and caches
                for name in [n for n in current if n not in attrs]:
                    delattr(ns, name)
            for name, value in attrs.items():
                if current.get(name, _MISSING) is not value:
                    setattr(ns, name, value)


_MISSING = object()


class TritonKernel:
    """A Triton kernel launched compiled on CUDA and interpreted on CPU: ``k[grid](*args)``.

    ``k[grid]`` must be followed by the call; the first tensor argument picks the mode.
    """

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._compiled = None
        self._interpreted = None

    def _variant(self, device: torch.device):
        if not HAVE_TRITON:
            raise RuntimeError(f"{self.__name__}: triton is not installed")
        if device.type == "cpu" or interpreter_enabled():
            if self._interpreted is None:
                from triton.runtime.interpreter import InterpretedFunction

                self._interpreted = InterpretedFunction(self.fn)
            return self._interpreted
        if self._compiled is None:
            self._compiled = triton.runtime.JITFunction(self.fn)
        return self._compiled

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            device = next(a.device for a in args if isinstance(a, torch.Tensor))
            kernel = self._variant(device)
            if kernel is self._interpreted:
                with _interpreter_scope():
                    return kernel[grid](*args, **kwargs)
            with torch.cuda.device(device):  # compiled launches go to the current device
                return kernel[grid](*args, **kwargs)

        return launch


def triton_kernel(fn: Callable) -> TritonKernel:
    """Decorator: the body is Triton language, launched through :class:`TritonKernel`."""
    return TritonKernel(fn)
