"""The layout of a job's ``output_dir``: where each stage writes, and how a later stage finds an earlier one's model.

Every path and file name under ``output_dir`` is spelled here and nowhere else::

    shards/                          prepared shards (unless data.shards puts them elsewhere)
    checkpoints/<train stage>/       Ray Train's run folder (unless train.storage_path puts it elsewhere)
    <train stage>/model/             the best checkpoint as a plain HF folder (or a peft adapter folder)
    <train stage>/train_summary.json steps, losses, where the model is (read by eval, serve, later train stages)
    <train stage>/run_spec.json      the settings of an unfinished run (a rerun resumes only with the same ones)
    <eval stage>/metrics.json, predictions.jsonl, report.md, attention/<id>.png
    <eval stage>/eval_summary.json   which model was scored, wall time, samples/s
    <model folder>/calibration.json  the model's confidence temperature, fitted by eval (eval.calibrate)
    <job name>.json                  trained vs baselines (eval.baselines)
    <tune stage>/search/             Tune's experiment (a rerun resumes it), search_settings.json beside it
    <tune stage>/trials/<trial id>/  each trial's own output_dir (a train stage named "train")
    <tune stage>/base/, base_model.json   the starting model every trial shares
    <tune stage>/trials.csv, trials.md, val_loss_curves.png, trial_starts.jsonl
    <tune stage>/best/model/, best/job.yaml, train_summary.json   the best trial, like a train stage's outputs
    mlflow.db, mlartifacts/          the MLflow store (tracking.uri: ""): a run per command, stage and trial
    tensorboard/<stage>/             TensorBoard event files (tracking.tensorboard)
    medvl.log                        everything Ray and the other libraries printed (the terminal shows medvl's own)
    comparison.md, comparison.png    a compare stage's table and chart of the job's train and eval stages

A tune stage writes a ``train_summary.json`` too, so "the model of stage X" means the same for both kinds.

``output_dir`` may be a local folder or a URL of any pyarrow filesystem (``s3://bucket/runs/job``): every path
here is a :class:`medvl.storage.Location`, read and written through its filesystem, so the stages are written
once for both and nothing lands in a local folder named after the URL. Model folders on object storage are
fetched to a local cache where they are loaded (:mod:`medvl.models.cache`). The driver's own files (the MLflow
store, TensorBoard events, ``medvl.log``) need a local disk: for an ``output_dir`` on object storage a command
works on a local copy that goes back to ``output_dir`` when it ends (:func:`driver_files`).
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medvl.storage import Location

if TYPE_CHECKING:
    from medvl.spec import JobSpec

SUMMARY_FILE = "train_summary.json"
RUN_SPEC_FILE = "run_spec.json"
MODEL_DIR = "model"
SHARDS_DIR = "shards"
CHECKPOINTS_DIR = "checkpoints"

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"
REPORT_FILE = "report.md"
ATTENTION_DIR = "attention"

SEARCH_DIR = "search"
SEARCH_SETTINGS_FILE = "search_settings.json"
TRIALS_DIR = "trials"
TRIAL_STAGE = "train"  # the one stage of a trial's spec
BASE_DIR = "base"
BASE_MODEL_RECORD = "base_model.json"
TRIAL_STARTS_FILE = "trial_starts.jsonl"
TRIAL_STARTS_DIR = "trial_starts"  # one object per start (object stores cannot append), gathered into the file
TRIALS_CSV = "trials.csv"
TRIAL_MODELS_FILE = "trial_models.json"  # every finished trial's exported model, best first (serve.adapters top:K)
TRIALS_MD = "trials.md"
CURVES_PNG = "val_loss_curves.png"
BEST_DIR = "best"
BEST_SPEC_FILE = "job.yaml"

EVAL_SUMMARY_FILE = "eval_summary.json"
CALIBRATION_FILE = "calibration.json"  # beside a model's weights: its confidence temperature (eval.calibrate)
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS_DIR = "mlartifacts"
TENSORBOARD_DIR = "tensorboard"
LOG_FILE = "medvl.log"
COMPARISON_MD = "comparison.md"
COMPARISON_PNG = "comparison.png"


@dataclass(frozen=True)
class RunLayout:
    """Paths under one ``output_dir`` (a local one made absolute: Ray workers and Tune trials run elsewhere).

    ``endpoint_url``: the S3-compatible endpoint of an ``s3://`` output_dir (``data.endpoint_url``).
    """

    root: Location

    @classmethod
    def of(cls, output_dir: str | Location, endpoint_url: str = "") -> RunLayout:
        return cls(output_dir if isinstance(output_dir, Location) else Location.of(output_dir, endpoint_url))

    @classmethod
    def for_spec(cls, spec: JobSpec) -> RunLayout:
        """A spec's ``output_dir``, reached with its ``data.endpoint_url`` when it is on S3."""
        return cls.of(spec.output_dir, spec.data.endpoint_url)

    def stage(self, name: str) -> Location:
        return self.root / name

    def model(self, stage: str) -> Location:
        return self.stage(stage) / MODEL_DIR

    def summary(self, stage: str) -> Location:
        return self.stage(stage) / SUMMARY_FILE

    def run_spec(self, stage: str) -> Location:
        return self.stage(stage) / RUN_SPEC_FILE

    @property
    def shards(self) -> Location:
        return self.root / SHARDS_DIR

    @property
    def checkpoints(self) -> Location:
        return self.root / CHECKPOINTS_DIR

    def comparison(self, job_name: str) -> Location:
        return self.root / f"{job_name}.json"

    # ---- an eval stage's folder
    def metrics(self, stage: str) -> Location:
        return self.stage(stage) / METRICS_FILE

    def predictions(self, stage: str) -> Location:
        return self.stage(stage) / PREDICTIONS_FILE

    def report(self, stage: str) -> Location:
        return self.stage(stage) / REPORT_FILE

    def attention(self, stage: str) -> Location:
        return self.stage(stage) / ATTENTION_DIR

    def eval_summary(self, stage: str) -> Location:
        return self.stage(stage) / EVAL_SUMMARY_FILE

    @property
    def comparison_md(self) -> Location:
        return self.root / COMPARISON_MD

    @property
    def comparison_png(self) -> Location:
        return self.root / COMPARISON_PNG

    # ---- what the driver records and shows: files of this machine (SQLite, an appended log, event files)
    @property
    def driver_dir(self) -> Path:
        """Where the driver keeps its own files: ``output_dir`` itself when it is local; for one on object storage
        the local working copy that :func:`driver_files` keeps while a command runs."""
        if self.root.is_local:
            return Path(self.root.path)
        if self.root.url not in _WORKING_COPIES:
            raise RuntimeError(f"{self.root.url}: the driver's files of an output_dir on object storage are only "
                               "reachable inside runs.driver_files()")
        return _WORKING_COPIES[self.root.url]

    @property
    def mlflow_db(self) -> Path:
        return self.driver_dir / MLFLOW_DB

    @property
    def mlflow_artifacts(self) -> Path:
        return self.driver_dir / MLFLOW_ARTIFACTS_DIR

    def tensorboard(self, stage: str) -> Path:
        return self.driver_dir / TENSORBOARD_DIR / stage

    @property
    def log_file(self) -> Path:
        return self.driver_dir / LOG_FILE


# Remote output_dir URL → the local working copy of its driver files while a command runs (see driver_files).
_WORKING_COPIES: dict[str, Path] = {}
DRIVER_FILES = (MLFLOW_DB, MLFLOW_ARTIFACTS_DIR, TENSORBOARD_DIR, LOG_FILE)


@contextmanager
def driver_files(layout: RunLayout) -> Iterator[Path]:
    """The folder of the driver's own files for one command (:attr:`RunLayout.driver_dir`).

    SQLite (the MLflow store) and an appended log need a local disk, but an ``output_dir`` on object storage
    must hold everything the run wrote. So a command works on a temporary local copy: what an earlier command
    left (``mlflow.db``, ``mlartifacts/``, ``tensorboard/``, ``medvl.log``) is fetched first and the copy goes
    back to ``output_dir`` when the command ends, however it ends; then the copy is removed. The trade-offs: a
    process killed with SIGKILL loses this command's log lines and runs, and two commands running at once on one
    ``output_dir`` keep the last one's store (point ``tracking.uri`` at an MLflow server to share one).
    """
    if layout.root.is_local:
        yield layout.driver_dir
        return
    copy = Path(tempfile.mkdtemp(prefix="medvl-driver-"))
    for name in DRIVER_FILES:
        remote = layout.root / name
        if remote.is_dir():
            remote.download(copy / name)
        elif remote.is_file():
            (copy / name).write_bytes(remote.read_bytes())
    _WORKING_COPIES[layout.root.url] = copy
    try:
        yield copy
    finally:
        del _WORKING_COPIES[layout.root.url]
        _upload_driver_files(layout, copy)


def _upload_driver_files(layout: RunLayout, copy: Path) -> None:
    try:
        for name in DRIVER_FILES:
            local = copy / name
            if local.is_dir():
                (layout.root / name).upload(local)
            elif local.is_file():
                (layout.root / name).write_bytes(local.read_bytes())
    except Exception as exc:  # noqa: BLE001 - the run's outputs are written; keep the copy for the user
        print(f"[medvl] could not copy the driver's files to {layout.root}: {exc!r}; they are in {copy}",
              file=sys.stderr, flush=True)
        return
    shutil.rmtree(copy, ignore_errors=True)


@dataclass(frozen=True)
class TuneLayout:
    """Paths inside a tune stage's folder."""

    root: Location

    @property
    def experiment(self) -> Location:
        return self.root / SEARCH_DIR

    @property
    def settings(self) -> Location:
        return self.root / SEARCH_SETTINGS_FILE

    def trial(self, trial_id: str) -> Location:
        return self.root / TRIALS_DIR / trial_id

    @property
    def base(self) -> Location:
        return self.root / BASE_DIR

    @property
    def base_record(self) -> Location:
        return self.root / BASE_MODEL_RECORD

    @property
    def starts(self) -> Location:
        """The trials' starts, one line each, gathered from :attr:`start_records` when the search ends."""
        return self.root / TRIAL_STARTS_FILE

    @property
    def start_records(self) -> Location:
        return self.root / TRIAL_STARTS_DIR

    @property
    def trials_csv(self) -> Location:
        return self.root / TRIALS_CSV

    def trial_model(self, trial_id: str) -> Path:
        return self.trial(trial_id) / MODEL_DIR

    @property
    def trial_models(self) -> Path:
        return self.root / TRIAL_MODELS_FILE

    @property
    def trials_md(self) -> Location:
        return self.root / TRIALS_MD

    @property
    def curves(self) -> Location:
        return self.root / CURVES_PNG

    @property
    def best(self) -> Location:
        return self.root / BEST_DIR

    @property
    def best_model(self) -> Location:
        return self.best / MODEL_DIR

    @property
    def best_spec(self) -> Location:
        return self.best / BEST_SPEC_FILE

    @property
    def summary(self) -> Location:
        return self.root / SUMMARY_FILE


# --------------------------------------------------------------------------------------------- summaries


def write_summary(stage_dir: Location, summary: dict[str, Any]) -> None:
    """A train or tune stage's summary; written last, so its presence means the stage finished."""
    (stage_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))


def read_summary(output_dir: str | Location, stage: str, endpoint_url: str = "") -> dict[str, Any]:
    summary = RunLayout.of(output_dir, endpoint_url).summary(stage)
    if not summary.is_file():
        raise FileNotFoundError(f"stage {stage!r} has not been trained yet ({summary} is missing)")
    return json.loads(summary.read_text())


def stage_model(output_dir: str | Location, stage: str, endpoint_url: str = "") -> str:
    """The model folder (a local path or a URL) a finished train or tune stage left (for a search: the best
    trial's)."""
    return read_summary(output_dir, stage, endpoint_url)["model_dir"]


def model_stage_before(stages: list, stage_name: str) -> str | None:
    """The last train or tune stage listed before ``stage_name``: the one whose model that stage uses."""
    last = None
    for stage in stages:
        if stage.name == stage_name:
            return last
        if stage.kind in ("train", "tune"):
            last = stage.name
    raise ValueError(f"no stage named {stage_name!r}")


def find_model_folder(location: Location, markers: tuple[str, ...]) -> str | None:
    """The model folder ``location`` names: itself, a stage folder (its summary says), ``model/`` or
    ``best/model/``; returned as a local path or a URL.

    ``markers``: the files that make a folder a saved model (see ``medvl.models.registry.model_markers``).
    """
    summary = location / SUMMARY_FILE
    if summary.is_file():
        return json.loads(summary.read_text())["model_dir"]
    for candidate in (location, location / MODEL_DIR, location / BEST_DIR / MODEL_DIR):
        if any((candidate / name).is_file() for name in markers):
            return str(candidate)
    return None
