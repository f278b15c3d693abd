"""Learning-rate schedule: linear warm-up, then cosine decay to a floor.

A pure function of the step (no scheduler object to save): resuming at step ``s`` gives the
same rate as an uninterrupted run by construction.
"""

from __future__ import annotations

import math


def learning_rate(step: int, *, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1) -> float:
    """The rate for optimizer step ``step`` (1-based).

    ``lr * step / warmup_steps`` during warm-up; then ``min + (lr - min) * (1 + cos(pi p)) / 2``
    with ``p`` going from 0 right after warm-up to 1 at ``max_steps`` and ``min = lr * min_lr_ratio``.
    """
    if step <= warmup_steps:
        return lr * step / max(warmup_steps, 1)
    floor = lr * min_lr_ratio
    progress = min((step - warmup_steps) / max(max_steps - warmup_steps, 1), 1.0)
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
