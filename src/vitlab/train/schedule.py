"""Learning-rate schedules as pure functions of the step (paper Appendix B.1: linear warmup, then cosine or
linear decay)."""

from __future__ import annotations

import math


def lr_at(step: int, *, total_steps: int, peak: float, warmup_steps: int = 0, kind: str = "cosine",
          min_lr: float = 0.0) -> float:
    """The learning rate used for optimiser step ``step`` (0-based) of ``total_steps``.

    Warmup rises linearly from peak/warmup to peak over ``warmup_steps``; then ``cosine`` or ``linear`` decays to
    ``min_lr`` at the last step, or ``constant`` stays at the peak.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if kind == "constant":
        return peak
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    if kind == "cosine":
        return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return min_lr + (peak - min_lr) * (1.0 - progress)
    raise ValueError(f"unknown schedule {kind!r}; expected cosine, linear or constant")
