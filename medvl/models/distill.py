"""Progressive self-distillation from an EMA teacher, as small pure functions.

The teacher is a frozen copy of the student whose weights trail it: after every optimizer step
``θ_t ← τ·θ_t + (1 − τ)·θ_s``, with the momentum τ rising linearly over training (0.95 → 0.995 by default),
so early on the teacher follows the student closely and later it averages over a long window.

Each task k (ITC, ITM, LM) adds a distillation term ``(L_s,k − L_t,k)²`` with the teacher's loss detached:
the student is pulled towards the teacher's loss *level* where it does worse than its own recent past, and
pushed on where it already does better (the term is zero when they agree). Task weights are a softmax over
tasks of the EMA-smoothed ratios ``L_s,k / L_t,k``: the task whose student lags its teacher most gets the
most weight. The total is ``K · Σ_k w_k · (L_s,k + (L_s,k − L_t,k)²)``; the factor K (number of tasks)
makes equal weights reproduce the plain sum of task losses used without distillation, so the learning rate
means the same with and without it.
"""
from __future__ import annotations

import torch


def ema_momentum(step: int, total_steps: int, start: float, end: float) -> float:
    """τ after ``step`` of ``total_steps`` optimizer steps: linear from ``start`` to ``end``, then held."""
    progress = min(1.0, step / total_steps) if total_steps > 0 else 1.0
    return start + (end - start) * progress


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, tau: float) -> None:
    """``θ_t ← τ·θ_t + (1 − τ)·θ_s`` for every parameter; buffers are copied (they are not learned)."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(tau).add_(s.detach().to(t.dtype), alpha=1.0 - tau)
    for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
        t.copy_(s)


def smooth_ratios(previous: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                  momentum: float = 0.9) -> torch.Tensor:
    """EMA of the student/teacher loss ratios (detached): ``m·previous + (1 − m)·L_s/L_t``."""
    ratio = student.detach() / teacher.detach().clamp_min(1e-8)
    return momentum * previous + (1.0 - momentum) * ratio


def task_weights(smoothed_ratios: torch.Tensor) -> torch.Tensor:
    """Softmax over tasks: sums to 1, largest for the task whose student lags its teacher most."""
    return torch.softmax(smoothed_ratios.detach().float(), dim=0)


def distilled_total(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``K · Σ_k w_k · (L_s,k + (L_s,k − L_t,k)²)`` over the K task losses (teacher detached)."""
    gap = student - teacher.detach()
    return student.numel() * (weights * (student + gap.square())).sum()
