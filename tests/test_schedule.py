"""The learning-rate schedule: transformers' warm-up + cosine by default, BLIP's start and floor rates when set."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup

from medvl.train.schedule import warmup_cosine


def rates(scheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def optimizer(lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_default_ends_are_transformers_warmup_cosine():
    ours = rates(warmup_cosine(optimizer(3e-4), 3e-4, warmup_steps=7, total_steps=50), 55)
    theirs = rates(get_cosine_schedule_with_warmup(optimizer(3e-4), 7, 50), 51)
    assert ours[:51] == pytest.approx(theirs, rel=1e-12, abs=1e-18)
    assert ours[51:] == [0.0] * 4  # held at the floor past the end (transformers' cosine would rise again)


def test_blip_dapt_schedule_by_hand():
    """The DAPT write-up's rates: warm-up from 5e-9 to 4e-7, cosine down to 1e-9."""
    peak, start, floor, warmup, total = 4e-7, 5e-9, 1e-9, 10, 110
    lr = rates(warmup_cosine(optimizer(peak), peak, warmup, total, start_lr=start, min_lr=floor), total + 5)
    assert lr[0] == pytest.approx(start)
    assert lr[5] == pytest.approx(start + (peak - start) * 5 / 10)
    assert lr[warmup] == pytest.approx(peak)
    assert lr[60] == pytest.approx(floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half-way
    assert lr[total] == pytest.approx(floor) and lr[total + 4] == pytest.approx(floor)  # held at the floor
    assert min(lr) == pytest.approx(floor) and max(lr) == pytest.approx(peak)
