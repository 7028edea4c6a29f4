"""Start (or join) Ray for a job: an in-process local Ray by default, a cluster when ``ray.address`` says so."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from medvl.spec import JobSpec


@contextmanager
def ray_session(spec: JobSpec) -> Iterator[None]:
    import ray

    if ray.is_initialized():  # a caller (a test, a notebook) already runs Ray: use it as it is
        yield
        return
    # A job submitted to a cluster (`medvl submit`) is told its cluster by RAY_ADDRESS, which Ray sets for every
    # job's driver: join that cluster, never start a local Ray beside it (nor pass num_cpus, refused when joining).
    address = spec.ray.address or os.environ.get("RAY_ADDRESS", "")
    # Local Ray needs no token auth; a cluster's own settings (RAY_AUTH_MODE, tokens) are left alone.
    if not address:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Train V2 tees each print of a worker into its logger too, so every line reached the driver twice. Off for a
    # local Ray (its workers inherit this environment); medvl's workers report through a board anyway.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    kwargs: dict = {"address": address or None, "log_to_driver": True}
    if not address and spec.ray.num_cpus:
        kwargs["num_cpus"] = spec.ray.num_cpus
    ray.init(**kwargs)
    # Ray Data's progress bars interleave badly with our own progress lines on a terminal, and redraw with
    # carriage returns in medvl.log; medvl draws the counts that matter (rows read, steps, samples generated).
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()
