"""Learning-rate schedule of the paper: linear warm-up from a small fraction, then cosine down to a floor.

The official code chains ``LinearLR`` and ``CosineAnnealingLR`` with ``T_max = total - warmup``, so past the last
step the cosine climbs back up; here the factor stays at the floor after ``total_steps``.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from refdecoder.errors import ConfigError

__all__ = ["warmup_cosine_factor", "warmup_cosine"]


def warmup_cosine_factor(
    step: int, total_steps: int, warmup_steps: int, warmup_start: float = 0.01, min_ratio: float = 0.01
) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    ``warmup_start`` at step 0 rising linearly to 1 at ``warmup_steps``; then
    ``min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2`` with ``p`` the fraction of the cosine phase done, reaching
    ``min_ratio`` at ``total_steps`` and staying there.
    """
    if step < warmup_steps:
        return warmup_start + (1.0 - warmup_start) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: Optimizer,
    total_steps: int,
    warmup_steps: int,
    warmup_start: float = 0.01,
    min_ratio: float = 0.01,
) -> LambdaLR:
    """A per-step ``LambdaLR`` applying :func:`warmup_cosine_factor` to every parameter group.

    Each group keeps its own base rate (so the decoder group stays at ``decoder_lr_ratio`` of the added modules).
    Call ``scheduler.step()`` once per optimizer step.
    """
    if total_steps < 1 or warmup_steps < 0:
        raise ConfigError(f"need total_steps >= 1 and warmup_steps >= 0, got {total_steps=}, {warmup_steps=}")
    if not (0 < warmup_start <= 1 and 0 <= min_ratio <= 1):
        raise ConfigError(f"need 0 < warmup_start <= 1 and 0 <= min_ratio <= 1, got {warmup_start}, {min_ratio}")
    return LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, total_steps, warmup_steps, warmup_start, min_ratio)
    )
