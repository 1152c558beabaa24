"""Exponential moving average of the trained weights (the paper uses a ratio of 0.99).

What is averaged: the fp32 *master* weights the optimizer updates, not the (bf16) copies the model
computes with: averaging bf16-rounded weights would add their rounding noise to every step's average.

Where it lives: sharded exactly like ZeRO's optimizer state. Each data-parallel rank averages only
its own fragment of each parameter's master (DeepSpeed links every model parameter to the piece of
the flat fp32 partition this rank owns, ``param._hp_mapping``), so the EMA costs 4 bytes per
trained parameter divided by the data-parallel size (not a full fp32 copy on every rank: 7 GB at
1.3B, 28 GB at 7B). Frozen parameters are not averaged: their average is themselves.

A fragment is a 1-D slice ``[offset, offset + numel)`` of the flattened (tensor-parallel local)
parameter; ``layout()`` records where each one sits, so checkpoints can put the full parameters back
together in any layout (``pretrain.train.checkpoint``). Without DeepSpeed (``sharded=False``, unit
tests and tools) every trained parameter is one whole fragment of itself.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.99, sharded: bool = False) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = model
        self.sharded = sharded
        self._params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        # name -> (offset, numel, local shape) of this rank's fragment
        self._slots: dict[str, tuple[int, int, tuple[int, ...]]] = {}
        for name, p in self._params.items():
            if sharded:
                mapping = getattr(p, "_hp_mapping", None)
                if mapping is None:  # no piece of this parameter's master lives on this rank
                    continue
                address = mapping.lp_fragment_address
                self._slots[name] = (int(address.start), int(address.numel), tuple(p.shape))
            else:
                self._slots[name] = (0, p.numel(), tuple(p.shape))
        self.shadow: dict[str, torch.Tensor] = {name: self._master(name).detach().clone() for name in self._slots}

    def _master(self, name: str) -> torch.Tensor:
        """This rank's fragment of the parameter's fp32 master (a 1-D view; read it, never write)."""
        param = self._params[name]
        if self.sharded:
            # Looked up every time: DeepSpeed re-links the fragments when it loads a checkpoint.
            return param._hp_mapping.hp_fragment
        return param.detach().reshape(-1).float()

    @torch.no_grad()
    def update(self) -> None:
        """Call once after every optimizer step that changed the weights (not after a skipped one)."""
        if not self.shadow:
            return
        names = list(self.shadow)
        torch._foreach_lerp_([self.shadow[n] for n in names], [self._master(n).float() for n in names],
                             1.0 - self.decay)

    # checkpoints ---------------------------------------------------------------------------------
    def layout(self) -> dict[str, list[int]]:
        """{name: [offset, numel, *local shape]} of this rank's fragments."""
        return {name: [offset, numel, *shape] for name, (offset, numel, shape) in self._slots.items()}

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow, "layout": self.layout()}

    def load_fragments(self, fragments: Mapping[str, torch.Tensor], layout: Mapping[str, list[int]]) -> bool:
        """Restore from fragments saved by a rank of the same layout; False (nothing changed) when
        they do not fit this rank's fragments (another layout or another trainable set)."""
        mine = self.layout()
        if {k: list(v) for k, v in layout.items()} != mine or set(fragments) != set(mine):
            return False
        with torch.no_grad():
            for name, value in fragments.items():
                self.shadow[name].copy_(value.reshape(-1))
        return True

    def load_full(self, averages: Mapping[str, torch.Tensor]) -> bool:
        """Restore from whole (tensor-parallel local) averages of every trained parameter; False
        when they do not fit (missing names or other shapes)."""
        for name, (_, _, shape) in self._slots.items():
            if name not in averages or tuple(averages[name].shape) != shape:
                return False
        with torch.no_grad():
            for name, (offset, numel, _) in self._slots.items():
                self.shadow[name].copy_(averages[name].reshape(-1)[offset:offset + numel])
        return True

    # whole averages (sampling) ------------------------------------------------------------------
    @torch.no_grad()
    def full_averages(self, comm=None, group=None) -> dict[str, torch.Tensor]:
        """{name: average shaped like the local parameter} of every trained parameter.

        Collective over the data-parallel ``group`` when sharded (every rank of it must call): each
        parameter is put together from its fragments with one sum-reduction, parameter by parameter
        so that no more than one extra parameter is ever held at a time on top of the result.
        """
        out = {}
        for name, param in self._params.items():
            full = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
            if name in self._slots:
                offset, numel, _ = self._slots[name]
                full[offset:offset + numel] = self.shadow[name]
            if self.sharded and comm is not None:
                full = comm.all_reduce(full, group=group)
            out[name] = full.reshape(param.shape)
        return out


def assemble_fragments(parts: list[tuple[Mapping[str, torch.Tensor], Mapping[str, list[int]]]],
                       what: str = "EMA") -> dict[str, torch.Tensor]:
    """Whole (tensor-parallel local) averages from the fragments of every data-parallel rank:
    ``parts`` = [(fragments, layout), ...]. Every element of every parameter must be covered once."""
    shapes: dict[str, tuple[int, ...]] = {}
    for _, layout in parts:
        for name, (_, _, *shape) in layout.items():
            shapes.setdefault(name, tuple(shape))
    out, covered = {}, {}
    for name, shape in shapes.items():
        numel = 1
        for size in shape:
            numel *= size
        out[name] = torch.zeros(numel, dtype=torch.float32)
        covered[name] = 0
    for fragments, layout in parts:
        for name, (offset, numel, *_shape) in layout.items():
            out[name][offset:offset + numel] = fragments[name].reshape(-1)
            covered[name] += numel
    short = [name for name, shape in shapes.items() if covered[name] != out[name].numel()]
    if short:
        raise ValueError(f"{what}: the data-parallel fragments do not cover {short[:5]} exactly "
                         "(a rank's file is missing or from another run)")
    return {name: out[name].reshape(shapes[name]) for name in out}


def parse_layout(metadata: Optional[Mapping[str, str]]) -> Optional[dict[str, list[int]]]:
    """The fragment layout stored in a safetensors file's metadata (None for a whole-tensor file)."""
    import json

    if not metadata or "ema_layout" not in metadata:
        return None
    return {k: [int(x) for x in v] for k, v in json.loads(metadata["ema_layout"]).items()}
