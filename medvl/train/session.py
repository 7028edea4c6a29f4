"""Where the training loop runs: a Ray Train worker, or a Tune trial's own process. The loop asks this seam, never
Ray directly, for its rank, device, datasets and last checkpoint, and hands it reports and the model to wrap.

* :class:`TrainWorkerSession`: a worker of ``TorchTrainer`` (any number of workers, DDP or DeepSpeed): Ray Train's
  context, dataset shards and checkpoints (persisted to the run's ``RunConfig.storage_path``).
* :class:`TrialSession`: the process of a one-worker Tune trial (see :mod:`medvl.tune.trial` for when): the
  datasets iterated directly, reports and checkpoints through Tune (``ray.tune.report``; Tune's ``FailureConfig``
  restarts the trial from its last checkpoint, ``ray.tune.get_checkpoint``). It keeps a local copy of the best
  checkpoint (lowest ``val_loss``) so that the trial exports the same folder Ray Train's best checkpoint gives.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch


class TrainWorkerSession:
    """Inside a ``TorchTrainer`` worker."""

    startup_mark = "worker_group"  # what the start-up up to the loop's entry was (see reporting.StartupClock)

    def __init__(self) -> None:
        import ray.train

        self._context = ray.train.get_context()

    @property
    def world_rank(self) -> int:
        return self._context.get_world_rank()

    @property
    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def dataset(self, name: str):
        import ray.train

        return ray.train.get_dataset_shard(name)

    def checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], folder: Path | None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None)


class TrialSession:
    """Inside a Tune function trainable, one process: rank 0 of 1, no process group.

    ``datasets``: the Ray datasets the loop reads whole ("train", "val"). ``best_dir``: where the best checkpoint
    so far is kept (replaced at each improvement; the trial exports it when the loop ends)."""

    startup_mark = None  # no worker group: the loop starts right after the driver side (imports count in "stage")

    def __init__(self, datasets: dict, best_dir: Path):
        self.datasets = datasets
        self.best_dir = best_dir
        self._best_record = best_dir.parent / f"{best_dir.name}.json"  # its val_loss, for a restarted trial
        self.best_val_loss = json.loads(self._best_record.read_text())["val_loss"] if (
            self._best_record.is_file() and best_dir.is_dir()) else math.inf
        self.last_metrics: dict[str, Any] = {}

    world_rank = 0

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # GPU trials run under TorchTrainer (medvl.tune.trial.runs_in_trial)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def dataset(self, name: str):
        return self.datasets[name]

    def checkpoint(self):
        import ray.tune

        return ray.tune.get_checkpoint()

    def report(self, metrics: dict[str, Any], folder: Path | None) -> None:
        import ray.tune

        if folder is not None and metrics["val_loss"] < self.best_val_loss:
            self.best_val_loss = metrics["val_loss"]
            self.best_dir.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".best-", dir=self.best_dir.parent))
            shutil.copytree(folder, staging, dirs_exist_ok=True)
            shutil.rmtree(self.best_dir, ignore_errors=True)
            staging.rename(self.best_dir)
            self._best_record.write_text(json.dumps({"val_loss": self.best_val_loss}))
        self.last_metrics = dict(metrics)
        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(folder) if folder else None)
