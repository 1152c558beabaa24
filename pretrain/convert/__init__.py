"""Weight conversion: HF Llama <-> megatron-core, the released JanusFlow and Janus-Pro layouts <-> ours,
and strict loading of a full state into one rank's share of the model.

Modules: ``llama`` (pure functions over dicts of tensors), ``release`` (JanusFlow's official checkpoint
layout and config.json, and the SigLIP pieces both families share), ``januspro`` (Janus-Pro's, with
its VQ-16 state apart), ``state`` (safetensors IO, strict loading). CLI: ``python -m pretrain.convert
--help``.

Words used here: a *full* state holds every tensor unsharded, with global layer indices (0-based,
``decoder.layers.{layer_number - 1}``); a *local* state is what one tensor-parallel rank of one
pipeline stage holds, with local layer indices, exactly as ``module.state_dict()`` names it.

Every check reports all problems at once (``StateDictError``), so a bad checkpoint is fixed in one go.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

Shape = tuple[int, ...]


class StateDictError(ValueError):
    """A state dict does not match what was expected. ``missing``: [(key, expected shape)],
    ``unexpected``: [(key, shape)], ``mismatched``: [(key, expected shape, got shape)]."""

    def __init__(
        self,
        what: str,
        missing: Sequence[tuple[str, Shape]] = (),
        unexpected: Sequence[tuple[str, Shape]] = (),
        mismatched: Sequence[tuple[str, Shape, Shape]] = (),
    ) -> None:
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        lines = [f"{what}: {len(self.missing)} missing, {len(self.unexpected)} unexpected, "
                 f"{len(self.mismatched)} wrong-shape keys"]
        lines += [f"  missing     {k}  expected {list(s)}" for k, s in self.missing]
        lines += [f"  unexpected  {k}  got {list(s)}" for k, s in self.unexpected]
        lines += [f"  wrong shape {k}  expected {list(e)}, got {list(g)}" for k, e, g in self.mismatched]
        super().__init__("\n".join(lines))


def shape_of(value) -> Shape:
    """Shape of a tensor, or a shape given as a sequence of ints."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)


def check_shapes(
    expected: Mapping[str, object],
    got: Mapping[str, object],
    what: str,
    may_be_missing: Iterable[str] = (),
) -> None:
    """Raise one ``StateDictError`` listing every key of ``expected`` absent from ``got`` (unless it
    starts with a prefix in ``may_be_missing``), every key of ``got`` not expected, and every shape
    that differs. Values are tensors or shapes."""
    prefixes = tuple(may_be_missing)
    missing = [
        (k, shape_of(v))
        for k, v in expected.items()
        if k not in got and not (prefixes and k.startswith(prefixes))
    ]
    unexpected = [(k, shape_of(v)) for k, v in got.items() if k not in expected]
    mismatched = [
        (k, shape_of(v), shape_of(got[k]))
        for k, v in expected.items()
        if k in got and shape_of(v) != shape_of(got[k])
    ]
    if missing or unexpected or mismatched:
        raise StateDictError(what, missing, unexpected, mismatched)
