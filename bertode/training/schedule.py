"""Learning-rate schedule: linear warm-up, then linear or cosine decay to
``min_lr_ratio`` x lr. Progress is the step fraction of ``max_steps``, or, when a
wall-clock budget ``max_time`` is set, the elapsed fraction of it (a time-based schedule
ends its decay when the budget ends, whatever the step rate)."""

from __future__ import annotations

import math


def lr_factor(step: int, elapsed: float, trainer) -> float:
    if step < trainer.warmup_steps:
        return (step + 1) / trainer.warmup_steps
    if trainer.max_time:
        progress = elapsed / trainer.max_time
    else:
        span = max(1, trainer.max_steps - trainer.warmup_steps)
        progress = (step - trainer.warmup_steps) / span
    progress = min(max(progress, 0.0), 1.0)
    floor = trainer.min_lr_ratio
    if trainer.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if trainer.schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    raise ValueError(f"trainer.schedule={trainer.schedule!r} is invalid; allowed: 'linear', 'cosine'")
