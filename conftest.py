"""Repository-root pytest hooks: the repo root is on sys.path (pyproject's pythonpath) and, on a
CPU-only host, DeepSpeed must pick its CPU accelerator before anything imports it."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
