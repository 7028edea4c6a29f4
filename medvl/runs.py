"""The layout of a job's ``output_dir``: where each stage writes, and how a later stage finds an earlier one's model.

Every path and file name under ``output_dir`` is spelled here and nowhere else::

    shards/                          prepared shards (unless data.shards puts them elsewhere)
    checkpoints/<train stage>/       Ray Train's run folder (unless train.storage_path puts it elsewhere)
    <train stage>/model/             the best checkpoint as a plain HF folder (or a peft adapter folder)
    <train stage>/train_summary.json steps, losses, where the model is (read by eval, serve, later train stages)
    <train stage>/run_spec.json      the settings of an unfinished run (a rerun resumes only with the same ones)
    <eval stage>/metrics.json, predictions.jsonl, report.md, attention/<id>.png
    <eval stage>/eval_summary.json   which model was scored, wall time, samples/s
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
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
TRIALS_CSV = "trials.csv"
TRIAL_MODELS_FILE = "trial_models.json"  # every finished trial's exported model, best first (serve.adapters top:K)
TRIALS_MD = "trials.md"
CURVES_PNG = "val_loss_curves.png"
BEST_DIR = "best"
BEST_SPEC_FILE = "job.yaml"

EVAL_SUMMARY_FILE = "eval_summary.json"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS_DIR = "mlartifacts"
TENSORBOARD_DIR = "tensorboard"
LOG_FILE = "medvl.log"
COMPARISON_MD = "comparison.md"
COMPARISON_PNG = "comparison.png"


@dataclass(frozen=True)
class RunLayout:
    """Paths under one ``output_dir`` (made absolute: Ray workers and Tune trials run in other directories)."""

    root: Path

    @classmethod
    def of(cls, output_dir: str | Path) -> RunLayout:
        return cls(Path(output_dir).absolute())

    def stage(self, name: str) -> Path:
        return self.root / name

    def model(self, stage: str) -> Path:
        return self.stage(stage) / MODEL_DIR

    def summary(self, stage: str) -> Path:
        return self.stage(stage) / SUMMARY_FILE

    def run_spec(self, stage: str) -> Path:
        return self.stage(stage) / RUN_SPEC_FILE

    @property
    def shards(self) -> Path:
        return self.root / SHARDS_DIR

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    def comparison(self, job_name: str) -> Path:
        return self.root / f"{job_name}.json"

    # ---- an eval stage's folder
    def metrics(self, stage: str) -> Path:
        return self.stage(stage) / METRICS_FILE

    def predictions(self, stage: str) -> Path:
        return self.stage(stage) / PREDICTIONS_FILE

    def report(self, stage: str) -> Path:
        return self.stage(stage) / REPORT_FILE

    def attention(self, stage: str) -> Path:
        return self.stage(stage) / ATTENTION_DIR

    def eval_summary(self, stage: str) -> Path:
        return self.stage(stage) / EVAL_SUMMARY_FILE

    # ---- what a run records and shows
    @property
    def mlflow_db(self) -> Path:
        return self.root / MLFLOW_DB

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / MLFLOW_ARTIFACTS_DIR

    def tensorboard(self, stage: str) -> Path:
        return self.root / TENSORBOARD_DIR / stage

    @property
    def log_file(self) -> Path:
        return self.root / LOG_FILE

    @property
    def comparison_md(self) -> Path:
        return self.root / COMPARISON_MD

    @property
    def comparison_png(self) -> Path:
        return self.root / COMPARISON_PNG


@dataclass(frozen=True)
class TuneLayout:
    """Paths inside a tune stage's folder."""

    root: Path

    @property
    def experiment(self) -> Path:
        return self.root / SEARCH_DIR

    @property
    def settings(self) -> Path:
        return self.root / SEARCH_SETTINGS_FILE

    def trial(self, trial_id: str) -> Path:
        return self.root / TRIALS_DIR / trial_id

    @property
    def base(self) -> Path:
        return self.root / BASE_DIR

    @property
    def base_record(self) -> Path:
        return self.root / BASE_MODEL_RECORD

    @property
    def starts(self) -> Path:
        return self.root / TRIAL_STARTS_FILE

    @property
    def trials_csv(self) -> Path:
        return self.root / TRIALS_CSV

    def trial_model(self, trial_id: str) -> Path:
        return self.trial(trial_id) / MODEL_DIR

    @property
    def trial_models(self) -> Path:
        return self.root / TRIAL_MODELS_FILE

    @property
    def trials_md(self) -> Path:
        return self.root / TRIALS_MD

    @property
    def curves(self) -> Path:
        return self.root / CURVES_PNG

    @property
    def best(self) -> Path:
        return self.root / BEST_DIR

    @property
    def best_model(self) -> Path:
        return self.best / MODEL_DIR

    @property
    def best_spec(self) -> Path:
        return self.best / BEST_SPEC_FILE

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY_FILE


# --------------------------------------------------------------------------------------------- summaries


def write_summary(stage_dir: Path, summary: dict[str, Any]) -> None:
    """A train or tune stage's summary; written last, so its presence means the stage finished."""
    (stage_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))


def read_summary(output_dir: str | Path, stage: str) -> dict[str, Any]:
    path = RunLayout.of(output_dir).summary(stage)
    if not path.exists():
        raise FileNotFoundError(f"stage {stage!r} has not been trained yet ({path} is missing)")
    return json.loads(path.read_text())


def stage_model(output_dir: str | Path, stage: str) -> str:
    """The model folder a finished train or tune stage left (for a search: the best trial's)."""
    return read_summary(output_dir, stage)["model_dir"]


def model_stage_before(stages: list, stage_name: str) -> str | None:
    """The last train or tune stage listed before ``stage_name``: the one whose model that stage uses."""
    last = None
    for stage in stages:
        if stage.name == stage_name:
            return last
        if stage.kind in ("train", "tune"):
            last = stage.name
    raise ValueError(f"no stage named {stage_name!r}")


def find_model_folder(path: Path, markers: tuple[str, ...]) -> Path | None:
    """The model folder ``path`` names: itself, a stage folder (its summary says), ``model/`` or ``best/model/``.

    ``markers``: the files that make a folder a saved model (see ``medvl.models.registry.model_markers``).
    """
    if (path / SUMMARY_FILE).is_file():
        return Path(json.loads((path / SUMMARY_FILE).read_text())["model_dir"]).absolute()
    for candidate in (path, path / MODEL_DIR, path / BEST_DIR / MODEL_DIR):
        if any((candidate / name).is_file() for name in markers):
            return candidate.absolute()
    return None
