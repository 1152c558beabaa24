"""Exponential moving average of the trained weights (the paper uses a ratio of 0.99).

Kept in float32 for the trainable parameters only: a frozen parameter's average is itself, so
storing it again would only cost memory. Export (``pretrain.export``) merges the averages with the
frozen weights of a checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.99) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = model
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def update(self) -> None:
        """Call once after every optimizer step that changed the weights (not after a skipped one)."""
        params = dict(self.model.named_parameters())
        for name, avg in self.shadow.items():
            avg.lerp_(params[name].detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the trainable parameters: {sorted(missing)[:10]}")
        self.decay = state["decay"]
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
