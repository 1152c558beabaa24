"""Learning-rate schedule: Table 1's linear warm-up to the peak, then constant; optionally a linear
decay to 0 over the stage's last steps (warm-up, stable, decay)."""

from __future__ import annotations


def lr_multiplier(step: int, warmup_steps: int, total_steps: int = 0, decay_steps: int = 0) -> float:
    """Multiplier of the peak LR for optimizer step ``step`` (0-based): (step+1)/warmup during the
    warm-up, so the first update is already non-zero, then 1; over the last ``decay_steps`` of
    ``total_steps`` it falls linearly, the last update still non-zero: (total-step)/decay."""
    if decay_steps > 0 and step >= total_steps - decay_steps:
        return max(total_steps - step, 0) / decay_steps
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return (step + 1) / warmup_steps
