"""Exact counts of host round trips and kernel launches of a piece of PyTorch code.

Two counters, used together through ``count_ops()``:

- **syncs**: points where the host must wait for the device. (a) Reads of tensor values into Python
  (``item``, ``tolist``, ``bool()``, ``int()``, ``float()``, ``__index__`` on a tensor), seen by a
  ``TorchFunctionMode``; (b) ATen ops whose output *shape* depends on tensor values (``nonzero``,
  ``masked_select``, boolean-mask indexing, ``repeat_interleave`` without ``output_size``, ``unique``,
  ...) and ops that return a Python value (``equal``), seen by a ``TorchDispatchMode``; (c) copies
  from a non-CPU tensor to the CPU. On a CPU-only host every one of them is still counted, so the
  counts measured on a laptop are the counts a GPU run would pay.
- **launches**: every ATen op that reaches the dispatcher's Python key and does work, i.e. all ops
  but views/aliases (``func.is_view``), metadata queries and bare allocations. On a GPU each is (at
  least) one kernel launch; composite ops are counted after they decompose, as the device sees them.

Counts are exact and do not depend on the machine's load (unlike times). Each event is tagged with
the current ``phase`` (e.g. "fwd" / "bwd") and, in the forward, with the innermost tagged module
(``tag_modules``), so a benchmark can print a breakdown.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Python-level reads of a tensor's value (each one waits for the device).
VALUE_READS = {
    torch.Tensor.item: "item",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.__bool__: "__bool__",
    torch.Tensor.__int__: "__int__",
    torch.Tensor.__float__: "__float__",
    torch.Tensor.__index__: "__index__",
}

# ATen ops whose output shape depends on data, or that hand a value back to Python.
DATA_DEPENDENT = {
    aten.nonzero.default, aten.nonzero.out, aten.argwhere.default,
    aten.masked_select.default, aten.masked_select.out,
    aten.unique_dim.default, aten._unique.default, aten._unique2.default,
    aten.unique_consecutive.default, aten.unique_dim_consecutive.default,
    aten.equal.default, aten.is_nonzero.default,
}

# Ops that launch no kernel: metadata, bare allocations, scalar reads (counted as syncs at the
# Python level instead) and no-copy reinterpretations.
NOT_LAUNCHES = {
    aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default,
    aten.new_empty.default, aten.new_empty_strided.default,
    aten._local_scalar_dense.default, aten.is_same_size.default,
    aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default, aten.sym_storage_offset.default,
    aten.lift_fresh.default, aten._unsafe_view.default, aten.set_.source_Storage_storage_offset,
    aten.resize_.default,
}


def _is_data_dependent(func, args, kwargs) -> Optional[str]:
    if func in DATA_DEPENDENT:
        return str(func.overloadpacket.__name__)
    if func in (aten.index.Tensor, aten._index_put_impl_.default, aten.index_put_.default, aten.index_put.default):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
            return f"{func.overloadpacket.__name__}[bool mask]"
    if func.overloadpacket is aten.repeat_interleave and func is not aten.repeat_interleave.self_int:
        output_size = kwargs.get("output_size", args[-1] if len(args) > 1 and not isinstance(args[-1], torch.Tensor) else None)
        if output_size is None:
            return "repeat_interleave[no output_size]"
    if func.overloadpacket is aten.bincount and (len(args) < 3 or not args[2]) and not kwargs.get("minlength"):
        return "bincount[no minlength]"
    if func in (aten._to_copy.default, aten.copy_.default):
        src = args[1] if func is aten.copy_.default else args[0]
        dst_device = kwargs.get("device") if func is aten._to_copy.default else args[0].device
        if isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst_device is not None \
                and torch.device(dst_device).type == "cpu":
            return "copy to host"
    return None


@dataclass
class OpCounts:
    """Events seen, by phase: ``syncs[phase]`` and ``launches[phase]`` are Counters of op names."""

    phase: str = "fwd"
    syncs: dict[str, Counter] = field(default_factory=dict)
    launches: dict[str, Counter] = field(default_factory=dict)
    launches_by_module: dict[str, Counter] = field(default_factory=dict)
    module_stack: list[str] = field(default_factory=list)

    def add_sync(self, what: str) -> None:
        self.syncs.setdefault(self.phase, Counter())[what] += 1

    def add_launch(self, what: str) -> None:
        self.launches.setdefault(self.phase, Counter())[what] += 1
        where = self.module_stack[-1] if self.module_stack else "(outside tagged modules)"
        self.launches_by_module.setdefault(self.phase, Counter())[where] += 1

    def total_syncs(self, phase: Optional[str] = None) -> int:
        return sum(sum(c.values()) for p, c in self.syncs.items() if phase in (None, p))

    def total_launches(self, phase: Optional[str] = None) -> int:
        return sum(sum(c.values()) for p, c in self.launches.items() if phase in (None, p))


class _ValueReadMode(TorchFunctionMode):
    def __init__(self, counts: OpCounts) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = VALUE_READS.get(func)
        if name is not None:
            self.counts.add_sync(name)
        return func(*args, **(kwargs or {}))


class _LaunchMode(TorchDispatchMode):
    def __init__(self, counts: OpCounts) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = _is_data_dependent(func, args, kwargs)
        if reason is not None:
            self.counts.add_sync(reason)
        if not func.is_view and func not in NOT_LAUNCHES and func is not aten.detach.default:
            self.counts.add_launch(str(func.overloadpacket.__name__))
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_ops(counts: Optional[OpCounts] = None) -> Iterator[OpCounts]:
    """Count syncs and launches of everything run inside the block (set ``counts.phase`` to split)."""
    counts = counts or OpCounts()
    with _ValueReadMode(counts), _LaunchMode(counts):
        yield counts


@contextlib.contextmanager
def tag_modules(counts: OpCounts, modules) -> Iterator[None]:
    """Attribute forward launches to the innermost running module of ``modules``: a dict or an
    iterable of (name, module) pairs (several modules may share a name)."""
    handles = []
    for name, module in (modules.items() if isinstance(modules, dict) else modules):
        # (the hooks must return None: a forward hook's return value replaces the module's output)
        handles.append(module.register_forward_pre_hook(lambda *_a, n=name: counts.module_stack.append(n) and None))
        handles.append(module.register_forward_hook(lambda *_a: counts.module_stack.pop() and None))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
