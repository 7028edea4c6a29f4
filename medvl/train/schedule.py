"""The learning-rate schedule every engine uses: linear warm-up, then a half cosine.

The rate rises linearly from ``train.warmup_start_lr`` to ``train.lr`` over the first
``warmup_ratio × total_steps`` optimizer steps, then decays along a half cosine to ``train.min_lr`` at
``total_steps``. With both ends at 0 (the defaults) this is transformers' ``get_cosine_schedule_with_warmup``;
BLIP's own recipes warm up from a small rate and stop at a floor (e.g. 5e-9 → 4e-7 → 1e-9 for the DAPT write-up).
"""
from __future__ import annotations

import functools
import math

import torch


def lr_factor(step: int, warmup_steps: int, total_steps: int, start: float, floor: float) -> float:
    """The multiplier of the peak rate after ``step`` steps; ``start`` and ``floor`` are fractions of the peak."""
    if step < warmup_steps:
        return start + (1.0 - start) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, peak_lr: float, warmup_steps: int, total_steps: int,
                  start_lr: float = 0.0, min_lr: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """``optimizer``'s schedule (its param groups' ``lr`` must be ``peak_lr``)."""
    factor = functools.partial(lr_factor, warmup_steps=warmup_steps, total_steps=total_steps,
                               start=start_lr / peak_lr, floor=min_lr / peak_lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
