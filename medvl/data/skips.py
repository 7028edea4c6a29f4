"""Count rows dropped while streaming (e.g. an image that no longer decodes), across Ray Data workers.

Preprocessing runs in many Ray processes; a named actor gathers their counts so that the run can report
"skipped: {unreadable_image: 1}" instead of silently training on fewer samples.

Ray is imported inside the functions: the recipes import :func:`report_skipped`, and ``medvl plan`` imports
the recipes' finetune policies on machines (a laptop, CI) that must not pay for, or need, Ray.
"""
from __future__ import annotations

from collections import Counter
from functools import cache

COUNTER_NAME = "medvl-skip-counter"


class SkipCounter:
    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def add(self, reason: str, n: int) -> None:
        self.counts[reason] += n

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


def ensure_skip_counter():
    """The cluster's counter, created on first use. It is detached and outside any placement group: created
    inside a Tune trial it would otherwise die with that trial (its owner, its placement group) while other
    trials still count into it. Runs on one cluster share it: :func:`skipped_since` takes a run's share of it
    (concurrent runs, such as a search's trials, see each other's counts)."""
    return _remote_counter().options(name=COUNTER_NAME, get_if_exists=True, namespace="medvl",
                                     lifetime="detached", scheduling_strategy="DEFAULT").remote()


@cache
def _remote_counter():
    import ray

    return ray.remote(num_cpus=0)(SkipCounter)


def report_skipped(reason: str, n: int) -> None:
    """Add to the job's count; a no-op outside Ray or when no driver created the counter."""
    import ray

    if not ray.is_initialized():
        return
    try:
        counter = ray.get_actor(COUNTER_NAME, namespace="medvl")
    except ValueError:
        return
    ray.get(counter.add.remote(reason, n))  # wait: a finished pipeline kills its actors, pending calls too


def skipped_counts() -> dict[str, int]:
    import ray

    return ray.get(ensure_skip_counter().snapshot.remote()) if ray.is_initialized() else {}


def skipped_since(before: dict[str, int]) -> dict[str, int]:
    """What was counted after ``before`` (an earlier :func:`skipped_counts`)."""
    now = skipped_counts()
    return {reason: n - before.get(reason, 0) for reason, n in now.items() if n > before.get(reason, 0)}
