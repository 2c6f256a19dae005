"""The consistency ramp every reference uses (Laine & Aila's sigmoid ramp-up), counted in the
references' 150-iteration "epochs"."""

from __future__ import annotations

import math


def sigmoid_rampup(current: float, rampup_length: float) -> float:
    """exp(-5 (1 - t/L)^2), clipped to [0, 1]; 1 when L == 0 (Laine & Aila, used by all references)."""
    if rampup_length == 0:
        return 1.0
    t = min(max(current, 0.0), rampup_length) / rampup_length
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def epoch_rampup(step: int, epoch_iterations: int, rampup_epochs: float) -> float:
    """sigmoid_rampup of step // epoch_iterations over rampup_epochs (iter_num // 150 upstream)."""
    return sigmoid_rampup(step // epoch_iterations, rampup_epochs)
