"""Cosine learning-rate schedule with linear warm-up, evaluated per optimisation step."""

from __future__ import annotations

import math


def cosine_with_warmup(
    step: int, *, total_steps: int, warmup_steps: int, base_lr: float,
    warmup_start_ratio: float = 1e-3, min_lr_ratio: float = 1e-2,
) -> float:
    """The learning rate at ``step`` (0-based).

    Linear from ``warmup_start_ratio·base_lr`` to ``base_lr`` over ``warmup_steps``, then a
    half cosine down to ``min_lr_ratio·base_lr`` at ``total_steps``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if step < warmup_steps:
        start = warmup_start_ratio * base_lr
        return start + (base_lr - start) * step / max(1, warmup_steps)
    floor = min_lr_ratio * base_lr
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return floor + 0.5 * (base_lr - floor) * (1.0 + math.cos(math.pi * progress))
