"""MLflow tracking, on by default: a parent run per ``medvl`` command, a child run per stage and per Tune trial.

Default store (``tracking.uri: ""``): a SQLite file ``<output_dir>/mlflow.db`` with artifacts under
``<output_dir>/mlartifacts``: no server, works offline, ``mlflow ui --backend-store-uri sqlite:///…/mlflow.db``
shows it. Any MLflow tracking URI (``http://host:5000``) logs to a team's server instead;
``tracking.enabled: false`` switches MLflow off. TensorBoard event files (``tracking.tensorboard``) and a
Weights & Biases run (only where the ``wandb`` package and ``WANDB_API_KEY`` are present) get the same metrics.

What each run holds: params = the resolved spec flattened to dotted keys (the stage's own ``set`` overrides
applied); metrics over optimizer steps (train loss, learning rate, grad norm, val loss, samples/s and tokens/s
per worker and in all, step time, GPU memory where there is a GPU); at the end the stage's summary (wall time,
throughput, parameters, peak memory) or its eval metrics; artifacts (metrics.json, report.md, attention maps,
the search's tables and curves).

Every write happens on the driver, which is why Ray's ``setup_mlflow`` is not called in the training function:

* On a cluster the default store (a file under ``output_dir``) is reachable from the driver only; Ray's own
  docs ask for a tracking server as soon as trials run on several nodes. One writing process also keeps SQLite
  free of lock contention between workers.
* ``setup_mlflow`` creates a new run every time it is called: a worker group restarted after a failure
  (``train.max_failures``) would split one stage over two runs, and the driver could not attach the stage's
  summary, eval metrics and artifacts to the run its workers logged to.
* Importing MLflow costs ~2 s of CPU per process; the workers do not pay it.

So rank 0 posts its step metrics to the stage's progress board (:mod:`medvl.tracking.progress`) and the driver
logs them. A search uses Ray's ``MLflowLoggerCallback`` (``medvl.tune.tracking``), which runs on the driver
already and logs every result a trial reports.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from medvl.runs import RunLayout
from medvl.storage import Location
from medvl.spec import JobSpec, StageSpec

PARENT_TAG = "mlflow.parentRunId"  # how MLflow nests runs
KIND_TAG = "medvl.kind"  # job | prepare | train | eval | tune | compare | trial
STAGE_TAG = "medvl.stage"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call
METRICS_PER_BATCH = 1000


@dataclass(frozen=True)
class RunRef:
    """Where a run lives: enough for another process (or a pickled Tune callback) to log to it."""

    uri: str
    experiment_id: str
    run_id: str


def tracking_uri(spec: JobSpec) -> str:
    """``tracking.uri``, or the run's own SQLite store."""
    return spec.tracking.uri or f"sqlite:///{RunLayout.for_spec(spec).mlflow_db}"


def experiment_name(spec: JobSpec) -> str:
    return spec.tracking.experiment or spec.name


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """A spec (or any dataclass / mapping) as dotted keys → text, the way MLflow params want it."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict) and value:
        flat: dict[str, str] = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return {prefix: text[:MAX_PARAM_CHARS]}


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The entries MLflow can chart: finite numbers (bools count as 0/1)."""
    out = {}
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[key] = number
    return out


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class MlflowRun:
    """One MLflow run, written through ``MlflowClient`` (no global active-run state)."""

    def __init__(self, client, ref: RunRef):
        self.client, self.ref = client, ref

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        for chunk in _chunks([Param(k, v) for k, v in params.items()], PARAMS_PER_BATCH):
            self.client.log_batch(self.ref.run_id, params=chunk)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(k, v, now, step or 0) for k, v in numeric(metrics).items()]
        for chunk in _chunks(entries, METRICS_PER_BATCH):
            self.client.log_batch(self.ref.run_id, metrics=chunk)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.ref.run_id, key, value)

    def log_artifact(self, path: Path | Location, folder: str | None = None) -> None:
        with local_copy(path) as local:
            if local.is_dir():
                self.client.log_artifacts(self.ref.run_id, str(local), artifact_path=folder or path.name)
            elif local.is_file():
                self.client.log_artifact(self.ref.run_id, str(local), artifact_path=folder)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.ref.run_id, status=status)


@contextmanager
def local_copy(path: Path | Location) -> Iterator[Path]:
    """A local path of ``path``: itself on this machine, else a temporary copy (an output_dir on object storage;
    the files logged as artifacts are small: metrics, reports, tables, overlays)."""
    if not isinstance(path, Location):
        yield path
    elif path.is_local:
        yield Path(path.path)
    else:
        with tempfile.TemporaryDirectory(prefix="medvl-artifact-") as tmp:
            local = Path(tmp) / path.name
            if path.is_dir():
                path.download(local)
            elif path.is_file():
                local.write_bytes(path.read_bytes())
            yield local


class TensorBoardLog:
    """``tracking.tensorboard``: the same scalars as event files in ``<output_dir>/tensorboard/<stage>/``."""

    def __init__(self, folder: Path):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(folder))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in numeric(metrics).items():
            self.writer.add_scalar(key, value, global_step=step or 0)

    def finish(self) -> None:
        self.writer.close()


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def wandb_available() -> bool:
    """W&B is never a dependency: used only where its package is installed and a key is set."""
    return installed("wandb") and bool(os.environ.get("WANDB_API_KEY"))


class WandbLog:
    def __init__(self, project: str, name: str, group: str, config: dict[str, str]):
        import wandb

        self.run = wandb.init(project=project, name=name, group=group, config=config, reinit=True)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        values = numeric(metrics)
        if values:
            self.run.log(values, step=step)

    def finish(self) -> None:
        self.run.finish()


class StageLog:
    """What one stage records: its MLflow run (if tracking is on), TensorBoard and W&B (if asked and present).

    ``NullStageLog``-like when every sink is off, so the stage code never branches on the settings.
    """

    def __init__(self, name: str, mlflow_run: MlflowRun | None = None, others: list | None = None):
        self.name, self.mlflow_run, self.others = name, mlflow_run, others or []

    @property
    def ref(self) -> RunRef | None:
        return self.mlflow_run.ref if self.mlflow_run else None

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        for sink in self._sinks():
            _quietly(sink.log_metrics, metrics, step)

    def log_artifact(self, path: Path | Location, folder: str | None = None) -> None:
        if self.mlflow_run is not None and path.exists():
            _quietly(self.mlflow_run.log_artifact, path, folder)

    def set_tag(self, key: str, value: str) -> None:
        if self.mlflow_run is not None:
            _quietly(self.mlflow_run.set_tag, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        if self.mlflow_run is not None:
            _quietly(self.mlflow_run.finish, status)
        for sink in self.others:
            _quietly(sink.finish)

    def _sinks(self) -> list:
        return ([self.mlflow_run] if self.mlflow_run else []) + self.others


def _quietly(call, *args) -> None:
    """A tracking hiccup (a busy server, a full disk) is reported, never allowed to fail a training run."""
    try:
        call(*args)
    except Exception as exc:  # noqa: BLE001
        print(f"[medvl tracking] {getattr(call, '__qualname__', call)} failed: {exc}", file=sys.stderr, flush=True)


class Tracker:
    """A command's tracking: the MLflow parent run (when enabled) and a :class:`StageLog` per stage."""

    def __init__(self, spec: JobSpec, enabled: bool = True, command: str = ""):
        self.spec = spec
        self.layout = RunLayout.for_spec(spec)
        self.parent: MlflowRun | None = None
        self.client = None
        if enabled and spec.tracking.enabled:
            self._open_parent(command)

    def _open_parent(self, command: str) -> None:
        from mlflow import MlflowClient

        uri = tracking_uri(self.spec)
        if not self.spec.tracking.uri:
            self.layout.driver_dir.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=uri)
        experiment_id = self._experiment_id()
        run = self.client.create_run(experiment_id, run_name=self.spec.name, tags={
            KIND_TAG: "job", "medvl.command": command or " ".join(sys.argv), "medvl.output_dir": str(self.layout.root),
        })
        self.parent = MlflowRun(self.client, RunRef(uri, experiment_id, run.info.run_id))
        self.parent.log_params(flatten(self.spec))

    def _experiment_id(self) -> str:
        name = experiment_name(self.spec)
        existing = self.client.get_experiment_by_name(name)
        if existing is not None:
            if existing.lifecycle_stage == "deleted":
                self.client.restore_experiment(existing.experiment_id)
            return existing.experiment_id
        location = None if self.spec.tracking.uri else self.layout.mlflow_artifacts.as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    @property
    def where(self) -> str:
        """A line saying where the runs go (printed at the start of a command)."""
        if self.parent is None:
            return "MLflow tracking is off (tracking.enabled: false)"
        uri = self.parent.ref.uri
        shown = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else uri
        return f"MLflow run {self.parent.ref.run_id} in experiment {experiment_name(self.spec)!r} ({shown})"

    def stage(self, stage: StageSpec, stage_spec: JobSpec) -> StageLog:
        mlflow_run = None
        if self.parent is not None:
            run = self.client.create_run(self.parent.ref.experiment_id, run_name=stage.name, tags={
                PARENT_TAG: self.parent.ref.run_id, KIND_TAG: stage.kind, STAGE_TAG: stage.name,
            })
            mlflow_run = MlflowRun(self.client, dataclasses.replace(self.parent.ref, run_id=run.info.run_id))
            _quietly(mlflow_run.log_params, flatten(stage_spec))
        others: list = []
        if stage_spec.tracking.tensorboard:
            others.append(TensorBoardLog(self.layout.tensorboard(stage.name)))
        if stage_spec.tracking.wandb and wandb_available():
            group = self.parent.ref.run_id if self.parent else self.spec.name
            others.append(WandbLog(experiment_name(stage_spec), stage.name, group, flatten(stage_spec)))
        return StageLog(stage.name, mlflow_run, others)

    def log_to_parent(self, metrics: dict[str, Any], prefix: str) -> None:
        """A stage's headline numbers on the parent run too (``<stage>/<metric>``), to compare commands."""
        if self.parent is not None:
            _quietly(self.parent.log_metrics, {f"{prefix}/{k}": v for k, v in numeric(metrics).items()})

    def log_artifact(self, path: Path | Location, folder: str | None = None) -> None:
        if self.parent is not None and path.exists():
            _quietly(self.parent.log_artifact, path, folder)

    def finish(self, status: str = "FINISHED") -> None:
        if self.parent is not None:
            _quietly(self.parent.finish, status)
