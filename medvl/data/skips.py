"""Count rows dropped while streaming (e.g. an image that no longer decodes), across Ray Data workers.

Preprocessing runs in many Ray processes; a named actor gathers their counts so that the run can report
"skipped: {unreadable_image: 1}" instead of silently training on fewer samples.
"""
from __future__ import annotations

from collections import Counter

import ray

COUNTER_NAME = "medvl-skip-counter"
_driver_handles: dict[str, "ray.actor.ActorHandle"] = {}


@ray.remote(num_cpus=0)
class SkipCounter:
    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def add(self, reason: str, n: int) -> None:
        self.counts[reason] += n

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


def ensure_skip_counter():
    """Create the counter from the driver, so that it lives as long as the driver (an actor dies with its
    owner: one created lazily by a preprocessing actor would vanish when the pipeline ends)."""
    job = ray.get_runtime_context().get_job_id()
    if job not in _driver_handles:  # keep the creating handle: when it is dropped the actor dies, name or not
        _driver_handles[job] = SkipCounter.options(name=COUNTER_NAME, get_if_exists=True, namespace="medvl").remote()
    return _driver_handles[job]


def report_skipped(reason: str, n: int) -> None:
    """Add to the job's count; a no-op outside Ray or when no driver created the counter."""
    if not ray.is_initialized():
        return
    try:
        counter = ray.get_actor(COUNTER_NAME, namespace="medvl")
    except ValueError:
        return
    ray.get(counter.add.remote(reason, n))  # wait: a finished pipeline kills its actors, pending calls too


def skipped_counts() -> dict[str, int]:
    return ray.get(ensure_skip_counter().snapshot.remote()) if ray.is_initialized() else {}
