"""Learning-rate schedule of Table 1: linear warm-up to the peak, then constant."""

from __future__ import annotations


def constant_with_warmup(step: int, warmup_steps: int) -> float:
    """Multiplier of the peak LR for optimizer step ``step`` (0-based): (step+1)/warmup during the
    warm-up, so the first update is already non-zero, then 1."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return (step + 1) / warmup_steps
