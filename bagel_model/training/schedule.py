"""The learning-rate schedule both training loops use: linear warm-up, then cosine decay to a floor.

The decay follows `progress` in [0, 1], the larger of the step and wall-clock fractions of a run's budget,
so a run that ends on time still finishes its decay. Not here: the optimizer or what it trains.
"""

from __future__ import annotations

import math


def warmup_cosine_lr(peak: float, step: int, progress: float, warmup_steps: int, final_ratio: float) -> float:
    """`peak` ramped over the first `warmup_steps` steps, times a cosine from 1 down to `final_ratio`."""
    warm = min(1.0, (step + 1) / warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return peak * warm * (final_ratio + (1 - final_ratio) * cosine)
