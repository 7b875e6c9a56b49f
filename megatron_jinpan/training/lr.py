"""Learning-rate schedule: linear warmup, then cosine (or linear) decay to optim.min_lr."""
from __future__ import annotations

import math


def learning_rate(step: int, optim, total_steps: int) -> float:
    """LR for optimizer step `step` (0-based)."""
    if optim.warmup > 0 and step < optim.warmup:
        return optim.lr * (step + 1) / optim.warmup
    if optim.schedule == "constant":
        return optim.lr
    decay_steps = max(1, (optim.decay_steps or total_steps) - optim.warmup)
    progress = min(1.0, (step - optim.warmup) / decay_steps)
    if optim.schedule == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr + (optim.lr - optim.min_lr) * factor
