"""Progressive self-distillation from an EMA teacher, as small pure functions.

The teacher is a frozen copy of the student whose weights trail it: after every optimizer step
``θ_t ← τ·θ_t + (1 − τ)·θ_s``, with the momentum τ rising linearly over training (0.95 → 0.995 by default),
so early on the teacher follows the student closely and later it averages over a long window.

The loss is ``Σ_k L_s,k + Σ_k w_k · MSE_k`` over the tasks k (ITC, ITM, LM): every task loss of the student at
weight 1, plus a distillation term per task, the mean squared difference between the student's and the
teacher's outputs for that task (teacher detached; the recipe says which outputs), weighted adaptively. Only the
distillation terms are weighted: the task losses mean the same with and without distillation, so the learning
rate does too, and at the first step (the teacher is the student) the loss is exactly their sum.

The weights are a softmax over tasks of the EMA-smoothed loss ratios ``L_s,k / L_t,k``: they sum to 1, and the
task whose student lags its teacher most is pulled towards the teacher hardest.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F


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


def distillation_mses(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
                      tasks: Iterable[str]) -> torch.Tensor:
    """Per task, the mean squared difference of the student's and the (detached) teacher's outputs, in fp32."""
    return torch.stack([F.mse_loss(student[k].float(), teacher[k].detach().float()) for k in tasks])


def distilled_total(task_losses: torch.Tensor, distillation: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ_k L_s,k + Σ_k w_k · MSE_k``: the student's task losses, plus the weighted distillation terms."""
    return task_losses.sum() + (weights.detach() * distillation).sum()
