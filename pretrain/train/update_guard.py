"""A step whose update would make the weights non-finite is skipped, like a step with a NaN gradient.

DeepSpeed skips a step whose gradients overflow. An update can still turn finite weights into
NaN/Inf with finite gradients when the optimizer state itself is damaged (a negative second
moment gives ``sqrt < 0``; a corrupt shard, a bit flip). Without a guard the NaN weights train on
silently, every later step is skipped for NaN gradients, and checkpoints fill with NaN.

How: the torch optimizer inside DeepSpeed's ZeRO/BF16 optimizer updates this rank's fp32 master
partition, and only afterwards does DeepSpeed copy the masters back into the model's weights. The
guard is a step post-hook of that inner optimizer: it checks the updated partition (one reduction, one small
all-reduce so every rank decides alike, one host read per step), and when any rank's partition is
not finite, every rank puts its masters back from the model's weights (still the pre-update values)
before DeepSpeed copies them over. The weights are untouched (bit for bit in fp32; in bf16 the
masters of that step lose their sub-bf16 bits), the trainer counts the step as skipped and does not
update the EMA, and ``train.max_consecutive_skipped_steps`` ends a run whose state stays broken.
"""

from __future__ import annotations

import torch


class UpdateGuard:
    def __init__(self, engine, comm) -> None:
        self.tripped = False
        self._comm = comm
        self._module = engine.module
        inner = engine.optimizer.optimizer  # the torch optimizer that updates the fp32 partitions
        self._inner = inner
        self._hook = inner.register_step_post_hook(self._after_inner_step)

    def reset(self) -> None:
        """Call before each optimizer step."""
        self.tripped = False

    def _after_inner_step(self, _optimizer, _args, _kwargs) -> None:
        masters = [p for group in self._inner.param_groups for p in group["params"]]
        finite = torch.stack([torch.isfinite(p).all() for p in masters]).all() if masters else torch.tensor(True)
        if self._comm.any_true(not bool(finite)):
            for param in self._module.parameters():
                mapping = getattr(param, "_hp_mapping", None)
                if mapping is not None:
                    mapping.update_hp()  # master fragment <- the model's (pre-update) weights
            self.tripped = True
