"""What training costs and how it goes, measured in the workers and shown and logged on the driver.

:class:`StepMeter` (one per worker) counts samples, tokens and training seconds (validation excluded). Every
``tracking.log_every_steps`` optimizer steps the workers pool their counts (one small ``all_gather_object``; the
steps run in lock-step anyway) and rank 0 posts train loss, learning rate, grad norm, samples/s and tokens/s per
worker and in all, step time and GPU memory to the stage's progress board. At each validation the cumulative
costs go into the metrics reported to Ray (a Tune trial's MLflow run logs them from there), and the last report
becomes the stage summary's cost fields: training seconds, samples/s, tokens/s, trainable / total parameters and
peak memory.

:class:`TrainingView` is the driver's side: it draws the posts as the stage's progress and logs them to the
stage's MLflow run (see :mod:`medvl.tracking.mlflow_store` for why the driver does the logging).
"""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from medvl.tracking.mlflow_store import StageLog
from medvl.tracking.progress import Progress


class StartupClock:
    """Where the time from a train stage's start to its first optimizer step went, in wall-clock seconds.

    The driver stamps the stage's start and the ``fit()`` call (``time.time()``: the stamps cross processes on
    one machine; across nodes, clock skew adds to the worker group's share); the worker stamps the loop's entry,
    the model being ready, the first batch and the first step. Each duration is named by the stamp that ends it:
    ``stage`` (from a Tune trial's start to its train stage: imports), ``driver`` (initial model, datasets),
    ``worker_group`` (Train's controller and workers, process group; absent when a Tune trial trains in its own
    process), ``model`` (the recipe's code imported, build / load and wrap), ``data`` (Ray Data's pipeline up to
    the first batch), ``first_step``.
    """

    def __init__(self, driver_stamps: dict[str, float] | None = None):
        self.stamps: list[tuple[str, float]] = list((driver_stamps or {}).items())

    def mark(self, name: str) -> bool:
        """Stamp ``name`` now, the first time only; True when this call stamped it."""
        if any(name == stamped for stamped, _ in self.stamps):
            return False
        self.stamps.append((name, time.time()))
        return True

    def durations(self) -> dict[str, float]:
        if len(self.stamps) < 2:
            return {}
        spans = {name: end - start for (_, start), (name, end) in zip(self.stamps, self.stamps[1:])}
        return spans | {"total": self.stamps[-1][1] - self.stamps[0][1]}


def batch_size_and_tokens(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Rows in a batch and the text tokens it trains on (attention masks summed; else the id tensors' size)."""
    rows = next(iter(batch.values())).shape[0] if batch else 0
    masks = [v for k, v in batch.items() if k.endswith("attention_mask")]
    if masks:
        return rows, int(sum(int(m.sum()) for m in masks))
    return rows, int(sum(v.numel() for k, v in batch.items() if k.endswith("input_ids")))


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """This process's peak resident memory and, on a GPU, the peak memory torch allocated there."""
    peak = {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    if device.type == "cuda":
        peak["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


def grad_norm(engine) -> float | None:
    """The gradient norm of the last optimizer step, before clipping (DDP engine or DeepSpeed's own)."""
    norm = getattr(engine, "last_grad_norm", None)
    if norm is None and hasattr(engine.model, "get_global_grad_norm"):
        norm = engine.model.get_global_grad_norm()
    return None if norm is None else float(norm)


@dataclass
class _Counts:
    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0
    steps: int = 0
    batches: int = 0

    def add(self, other: _Counts) -> None:
        self.samples += other.samples
        self.tokens += other.tokens
        self.seconds += other.seconds
        self.steps += other.steps
        self.batches += other.batches


@dataclass
class StepMeter:
    """One worker's counters; ``board`` (rank 0 posts to it) is None inside a Tune trial."""

    board: Any
    every: int
    rank: int
    device: torch.device
    parameters: dict[str, int | float] = field(default_factory=dict)  # models.base.parameter_report
    startup: StartupClock = field(default_factory=StartupClock)
    interval: _Counts = field(default_factory=_Counts)
    total: _Counts = field(default_factory=_Counts)
    _clock: float = field(default_factory=time.perf_counter)
    _paused: bool = False

    def count(self, batch: dict[str, torch.Tensor]) -> None:
        rows, tokens = batch_size_and_tokens(batch)
        self.interval.samples += rows
        self.interval.tokens += tokens
        self.interval.batches += 1

    def pause(self) -> None:
        """Stop the training clock (validation and checkpoints are not training time)."""
        if not self._paused:
            self.interval.seconds += time.perf_counter() - self._clock
            self._paused = True

    def resume(self) -> None:
        self._clock, self._paused = time.perf_counter(), False

    def after_step(self, step: int, epoch: int, losses: list[float], engine) -> None:
        """Called by every worker after every optimizer step; every ``every`` steps they pool and rank 0 posts.

        ``losses``: this epoch's micro-batch losses so far (the loop's list; its tail is this interval's)."""
        self.interval.steps += 1
        if self.board is None or step % self.every:
            return
        self.pause()
        workers = self._pool(self.interval)
        self.total.add(self.interval)
        recent = losses[-self.interval.batches:] or losses[-1:]
        if self.rank == 0:
            metrics = {"train_loss": sum(recent) / max(1, len(recent)), "lr": engine.lr(),
                       "grad_norm": grad_norm(engine), "epoch": epoch,
                       **_rates(workers), **peak_memory_mb(self.device)}
            if self.device.type != "cuda":
                metrics.pop("peak_memory_mb")  # a step metric on GPUs only; the summary keeps the CPU peak
            self.board.post.remote({"kind": "step", "step": step, "epoch": epoch, "metrics": metrics})
        self.interval = _Counts()
        self.resume()

    def report_metrics(self) -> dict[str, float]:
        """Cumulative costs over every worker, for ``ray.train.report`` (called by all workers together, with the
        clock paused for the validation)."""
        self.pause()
        self.total.add(self.interval)
        self.interval = _Counts()
        totals = self._pool(self.total, memory=True)
        seconds = max(t["seconds"] for t in totals) or 1e-9
        samples, tokens = sum(t["samples"] for t in totals), sum(t["tokens"] for t in totals)
        steps = max(t["steps"] for t in totals) or 1
        return {
            "train_time_s": seconds, "samples_trained": samples, "samples_per_s": samples / seconds,
            "tokens_per_s": tokens / seconds, "step_time_s": seconds / steps,
            "peak_memory_mb": max(t["peak_memory_mb"] for t in totals),
            **({"peak_gpu_memory_mb": max(t["peak_gpu_memory_mb"] for t in totals)}
               if "peak_gpu_memory_mb" in totals[0] else {}),
            **self.parameters,
            "startup_s": self.startup.durations(),
        }

    def note(self, message: str) -> None:
        """A line for the person watching: through the board, or printed where there is none."""
        if self.rank != 0:
            return
        if self.board is not None:
            self.board.post.remote({"kind": "note", "message": message})
        else:
            print(f"[medvl train] {message}", flush=True)

    def validation(self, step: int, metrics: dict[str, Any]) -> None:
        if self.rank == 0 and self.board is not None:
            self.board.post.remote({"kind": "validation", "step": step, "metrics": metrics})

    def _pool(self, counts: _Counts, memory: bool = False) -> list[dict[str, float]]:
        mine = {**vars(counts), **(peak_memory_mb(self.device) if memory else {})}
        if not (dist.is_available() and dist.is_initialized()):
            return [mine]
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        return gathered


def _rates(workers: list[dict[str, float]]) -> dict[str, float]:
    """samples/s and tokens/s in all (and per worker when there are several), seconds per optimizer step."""
    rates: dict[str, float] = {}
    for rank, counts in enumerate(workers):
        seconds = counts["seconds"] or 1e-9
        if len(workers) > 1:
            rates[f"worker{rank}/samples_per_s"] = counts["samples"] / seconds
            rates[f"worker{rank}/tokens_per_s"] = counts["tokens"] / seconds
    rates["samples_per_s"] = sum(c["samples"] / (c["seconds"] or 1e-9) for c in workers)
    rates["tokens_per_s"] = sum(c["tokens"] / (c["seconds"] or 1e-9) for c in workers)
    rates["step_time_s"] = max(c["seconds"] / max(1, c["steps"]) for c in workers)
    return rates


class TrainingView:
    """The driver's side of a train stage's board: progress on the terminal, step metrics in the stage's run."""

    def __init__(self, progress: Progress, log: StageLog):
        self.progress, self.log = progress, log

    def __call__(self, posts: list[dict]) -> None:
        for post in posts:
            kind = post["kind"]
            if kind == "step":
                metrics = post["metrics"]
                self.log.log_metrics(metrics, post["step"])
                self.progress.update(post["step"], epoch=post["epoch"] + 1, loss=round(metrics["train_loss"], 4),
                                     **{"samples/s": round(metrics["samples_per_s"], 1)})
            elif kind == "validation":
                metrics = post["metrics"]
                self.log.log_metrics(metrics, post["step"])
                self.progress.note(f"validation at step {post['step']}: val_loss {metrics['val_loss']:.4f}"
                                   + (" (stopping early)" if metrics.get("stopped_early") else ""))
                self.progress.update(post["step"])
            elif kind == "note":
                self.progress.note(post["message"])
