"""The weight rule both conformance fixtures (janusflow_tiny, januspro_tiny) share, and its checksums."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch


def rebuild_weights(fixture: Path) -> dict[str, torch.Tensor]:
    """The fixture README's rule: for each [key, shape] of keys.json, randn(shape) * 0.02 drawn from a
    generator seeded with crc32(key), plus 1 for 1-D norm weights."""
    weights = {}
    for key, shape in json.loads((fixture / "keys.json").read_text()):
        gen = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")))
        value = torch.randn(shape, dtype=torch.float32, generator=gen) * 0.02
        if len(shape) == 1 and "norm" in key and key.endswith("weight"):
            value = value + 1
        weights[key] = value
    return weights


def check_weight_checksums(weights: dict[str, torch.Tensor], meta: dict) -> None:
    """Every rebuilt tensor against fixture_meta.json's float64 sum and first element."""
    sums = meta["weight_checksums"]
    assert sums["columns"] == ["key", "float64 sum", "first element"]
    assert sorted(weights) == sorted(row[0] for row in sums["rows"])
    for key, total, first in sums["rows"]:
        assert weights[key].double().sum().item() == pytest.approx(total, abs=1e-6, rel=1e-9), key
        assert weights[key].flatten()[0].item() == first, key
