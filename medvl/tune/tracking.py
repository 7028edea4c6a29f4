"""What a search records and shows, both on the driver as Tune callbacks.

* :class:`TrialRuns`: Ray's ``MLflowLoggerCallback`` with each trial's MLflow run a child of the tune stage's
  run, the trial's whole spec (base spec + sampled values) as params, and every result the trial reports
  (train loss, val loss, learning rate, samples/s, tokens/s, step time…) logged at its optimizer step. When a
  trial ends, its train summary's costs (wall time, throughput, parameters, peak memory) are added.
* :class:`SearchProgress`: trials running / stopped early / finished (and failed) and the best metric so far,
  as one :class:`medvl.tracking.progress.Progress`.

Tune pickles its callbacks with the experiment (a resumed search runs with the ones it started with), so both
keep only plain settings and rebuild their clients and progress lines after unpickling. A resumed search
therefore logs its trials under the tune stage run of the command that started it.
"""
from __future__ import annotations

from typing import Any

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune import Callback

from medvl.runs import TRIAL_STAGE, RunLayout, TuneLayout, read_summary
from medvl.spec import JobSpec, StageSpec
from medvl.storage import Location
from medvl.tracking.mlflow_store import (KIND_TAG, PARENT_TAG, MlflowRun, RunRef, experiment_name, flatten,
                                         numeric)
from medvl.tracking.progress import Progress, stage_label
from medvl.tune.trial import trial_spec

# Tune's own bookkeeping in every result: not worth a chart.
TUNE_BOOKKEEPING = ("timestamp", "pid", "time_this_iter_s", "time_since_restore", "iterations_since_restore",
                    "timesteps_since_restore", "timesteps_total", "episodes_total", "training_iteration", "done")
SUMMARY_COSTS = ("wall_time_s", "train_time_s", "samples_per_s", "tokens_per_s", "trainable_params",
                 "total_params", "peak_memory_mb", "peak_gpu_memory_mb")


def search_callbacks(spec: JobSpec, stage: StageSpec, parent: RunRef | None) -> list[Callback]:
    """The tune stage's callbacks: its trials' MLflow runs (when tracking is on) and its progress line."""
    from medvl.data.shards import read_manifest
    from medvl.train.trainer import planned_steps
    from medvl.tune.search import expected_trials
    from medvl.tune.space import check_space_for
    from medvl.tune.stage import base_trial_spec

    tune_dir = RunLayout.for_spec(spec).stage(stage.name)
    base = base_trial_spec(spec)
    rows = read_manifest(spec.shards_location, spec.data.endpoint_url)["counts"]["train"]
    max_steps = spec.tune.max_steps or planned_steps(rows, trial_spec(base, {}, TuneLayout(tune_dir).trial("x")))
    space = check_space_for(spec.tune.space, spec.tune.search_alg)
    callbacks: list[Callback] = [SearchProgress(stage_label("tune", stage.name), expected_trials(spec, space), spec.tune.metric,
                                                spec.tune.mode, max_steps, spec.tracking.progress_every_s)]
    if parent is not None:
        callbacks.append(TrialRuns(parent, experiment_name(spec), base, tune_dir))
    return callbacks


class TrialRuns(MLflowLoggerCallback):
    """A child MLflow run per trial, under the tune stage's run (see the module docstring)."""

    def __init__(self, parent: RunRef, experiment: str, base: dict, tune_dir: Location):
        super().__init__(tracking_uri=parent.uri, experiment_name=experiment,
                         tags={PARENT_TAG: parent.run_id, KIND_TAG: "trial"})
        self.parent, self.base, self.tune_dir = parent, base, tune_dir
        self._runs: dict[str, MlflowRun] = {}
        self._last_step: dict[str, int] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_runs"] = {}  # clients hold connections; rebuilt on use
        return state

    def _client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.parent.uri)

    def log_trial_start(self, trial) -> None:
        if trial in self._trial_runs:  # a trial restarted within this search keeps its run
            return
        tags = {**self.tags, "trial_name": str(trial), "medvl.trial_id": trial.trial_id}
        run = self.mlflow_util.start_run(tags=tags, run_name=trial.trial_id)
        self._trial_runs[trial] = run.info.run_id
        mlflow_run = self._run(trial)
        folder = TuneLayout(self.tune_dir).trial(trial.trial_id)
        mlflow_run.log_params(flatten(trial_spec(self.base, trial.config, folder)))

    def log_trial_result(self, iteration: int, trial, result: dict[str, Any]) -> None:
        step = int(result.get("step", iteration))
        if trial not in self._trial_runs or self._last_step.get(trial.trial_id) == step:
            return  # an epoch that ended on a validation reports it twice (a new resume point), logged once
        self._last_step[trial.trial_id] = step
        metrics = {k: v for k, v in numeric(result).items() if k not in TUNE_BOOKKEEPING}
        self._run(trial).log_metrics(metrics, step)

    def log_trial_end(self, trial, failed: bool = False) -> None:
        if trial not in self._trial_runs:
            return
        trial_dir = TuneLayout(self.tune_dir).trial(trial.trial_id)
        try:
            summary = read_summary(trial_dir, TRIAL_STAGE)  # absent when ASHA stopped the trial
        except FileNotFoundError:
            summary = {}
        costs = {k: summary[k] for k in SUMMARY_COSTS if k in summary}
        if costs:
            self._run(trial).log_metrics(costs, summary.get("steps"))
        super().log_trial_end(trial, failed)
        self._runs.pop(trial.trial_id, None)

    def _run(self, trial) -> MlflowRun:
        if trial.trial_id not in self._runs:
            ref = RunRef(self.parent.uri, self.parent.experiment_id, self._trial_runs[trial])
            self._runs[trial.trial_id] = MlflowRun(self._client(), ref)
        return self._runs[trial.trial_id]


class SearchProgress(Callback):
    """Trials running / stopped early / finished and the best metric so far (see the module docstring)."""

    def __init__(self, label: str, trials: int, metric: str, mode: str, max_steps: int, every_s: float):
        self.label, self.trials, self.metric, self.mode = label, trials, metric, mode
        self.max_steps, self.every_s = max_steps, every_s
        self.best: float | None = None
        self.last_step: dict[str, int] = {}
        self.running: set[str] = set()
        self.ended = {"stopped": 0, "finished": 0, "failed": 0}
        self._progress: Progress | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_progress": None}

    @property
    def progress(self) -> Progress:
        if self._progress is None:
            self._progress = Progress(self.label, total=self.trials, unit="trials", every_s=self.every_s)
        return self._progress

    def on_step_end(self, iteration, trials, **info) -> None:
        self._show()  # Tune's loop turns often: the plain line's interval is kept between trial events too

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.running.add(trial.trial_id)
        self._show()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.last_step[trial.trial_id] = int(result.get("step", 0))
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and (self.best is None or
                                                 (value < self.best if self.mode == "min" else value > self.best)):
            self.best = float(value)
        self._show()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        step = self.last_step.get(trial.trial_id, 0)
        outcome = "finished" if step >= self.max_steps else "stopped"
        self._end(trial, outcome, f"trial {trial.trial_id} {outcome} at step {step}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._end(trial, "failed", f"trial {trial.trial_id} failed (its error is in the search's folder)")

    def on_experiment_end(self, trials, **info) -> None:
        self.progress.close()

    def _end(self, trial, outcome: str, message: str) -> None:
        self.running.discard(trial.trial_id)
        self.ended[outcome] += 1
        self.progress.note(message)
        self._show()

    def _show(self) -> None:
        fields: dict[str, Any] = {"running": len(self.running), "stopped early": self.ended["stopped"],
                                  "finished": self.ended["finished"]}
        if self.ended["failed"]:
            fields["failed"] = self.ended["failed"]
        if self.best is not None:
            fields[f"best {self.metric}"] = round(self.best, 4)
        self.progress.update(sum(self.ended.values()), **fields)
