"""Repository-root pytest hooks: the repo root is on sys.path (pyproject's pythonpath) and, on a
CPU-only host, DeepSpeed must pick its CPU accelerator before anything imports it."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_collection_modifyitems(config, items):
    """``gpu``-marked tests skip with one reason on a host without CUDA (CI, laptops)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
