"""The tune stage (``medvl tune SPEC``): search the space, then write the table, the curves and the best trial.

Outputs go to the stage's folder (the stage is named ``tune`` unless the spec says otherwise), laid out as
:class:`medvl.runs.TuneLayout` says: Tune's experiment (rerunning the command resumes it), each trial's train
stage, the starting model when the recipe builds one (shared by every trial) and the files of
``medvl/tune/results.py``.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict

from medvl import storage
from medvl.data.shards import read_manifest
from medvl.models.cache import initial_model_in
from medvl.models.registry import build_recipe
from medvl.runs import RunLayout, TuneLayout
from medvl.spec import JobSpec, StageSpec
from medvl.storage import Location
from medvl.tune import results as tables
from medvl.tune.search import expected_trials, run_search
from medvl.tune.space import check_space_for, resolve_space_path
from medvl.tune.trial import gather_starts, runs_in_trial, trial_spec


def run_tune_stage(spec: JobSpec, stage: StageSpec, start_from: str | None = None,
                   callbacks: list | None = None) -> dict:
    """Run (or resume) the search; returns the summary (``complete`` False when it was interrupted)."""
    from medvl.train.trainer import check_cpu_budget, planned_steps, storage_location, training_texts

    tune_dir = RunLayout.for_spec(spec).stage(stage.name)
    layout = TuneLayout(tune_dir)
    tune_dir.mkdir()
    space = check_space_for(spec.tune.space, spec.tune.search_alg)
    base = base_trial_spec(spec)
    model_source = start_from or starting_model(spec, tune_dir, lambda: training_texts(spec))
    train_rows = read_manifest(spec.shards_location, spec.data.endpoint_url)["counts"]["train"]
    example = trial_spec(base, {}, layout.trial("example"))
    check_cpu_budget(example)  # fail here, not in every trial
    max_t = spec.tune.max_steps or planned_steps(train_rows, example)
    print(f"[medvl tune] {stage.name}: space {spec.tune.space} ({len(space)} keys), {spec.tune.search_alg} search, "
          f"scheduler {spec.tune.scheduler}, up to {max_t} steps per trial", flush=True)

    datasets = trial_datasets(example, space, model_source, train_rows)
    in_process = runs_in_trial(example, [dimension.field for dimension in space])
    outcome = run_search(spec, space, tune_dir, base, model_source, max_t, callbacks, datasets, in_process)
    gather_starts(layout)
    planned = {}
    for result in outcome.results:
        trial_id = result.path.rstrip("/").rsplit("/", 1)[-1]
        planned[trial_id] = planned_steps(train_rows, trial_spec(base, result.config, layout.trial(trial_id)))
    rows = tables.trial_rows(outcome.results, outcome.statuses, space, spec.tune.metric, spec.tune.mode, planned)
    tables.write_tables(rows, space, spec.tune.metric, tune_dir)
    tables.plot_curves(rows, spec.tune.metric, layout.curves)
    summary = {"complete": outcome.complete, "restored": outcome.restored, "trials": len(rows),
               "stopped_early": sum(r.stopped_early for r in rows), "tune_dir": str(tune_dir)}
    if not outcome.complete:
        print(f"[medvl tune] {stage.name}: interrupted with {sum(r.status == 'TERMINATED' for r in rows)} of "
              f"{expected_trials(spec, space)} trials finished; run the same command again to resume", flush=True)
        return summary
    best = rows[0]
    if math.isnan(best.best):
        errors = [str(e).splitlines()[0] for e in outcome.results.errors][:1]
        raise RuntimeError(f"tune stage {stage.name!r}: no trial reported {spec.tune.metric} "
                           f"({len(outcome.results.errors)} failed{': ' + errors[0] if errors else ''}); "
                           f"see {layout.experiment}")
    # Trials keep their checkpoints where storage_location says for the trial's spec (on S3 when output_dir or
    # train.storage_path is): Ray reports their paths inside that filesystem.
    filesystem = None
    trial_storage = storage_location(trial_spec(base, best.config, layout.trial(best.trial_id)))
    if storage.is_remote(trial_storage):
        filesystem, _ = storage.filesystem_for(trial_storage, spec.data.endpoint_url)
    model_dir = tables.export_best(best, layout.best_model, build_recipe(spec), filesystem)
    if spec.train.finetune == "lora":  # adapters are megabytes; a whole model per trial would not be
        tables.export_trials(rows, layout, build_recipe(spec), spec.tune.metric, filesystem)
    tables.write_best_spec(tables.best_job_spec(spec, stage, best), best, spec.tune.metric, layout.best_spec)
    tables.write_summary(tune_dir, stage, best, model_dir, model_source, spec.tune.metric)
    print(f"[medvl tune] {stage.name}: best trial {best.trial_id} ({best.config}) {spec.tune.metric} "
          f"{best.best:.4f} at step {best.steps}; {summary['stopped_early']} of {len(rows)} trials stopped early; "
          f"model → {model_dir}", flush=True)
    return summary | {"best_trial": best.trial_id, "best_config": best.config, "model_dir": str(model_dir),
                      f"best_{spec.tune.metric}": best.best}


# Searched fields that leave preprocessing as it is: trials that differ only in these can share the decoded data.
DATA_NEUTRAL_PREFIXES = ("train.", "tune.", "tracking.", "model.lora_")


def trial_datasets(example: JobSpec, space, model_source: str, train_rows: int) -> dict | None:
    """The splits preprocessed once for every trial, when no searched field changes preprocessing and they are
    small enough (``trainer.shared_training_datasets``); None: each trial streams its own."""
    from medvl.train.trainer import shared_training_datasets

    if not all(dimension.field.startswith(DATA_NEUTRAL_PREFIXES) for dimension in space):
        return None
    datasets = shared_training_datasets(example, build_recipe(example), model_source, train_rows)
    if datasets is not None:
        print("[medvl tune] the training and validation splits are preprocessed once and shared by every trial",
              flush=True)
    return datasets


def base_trial_spec(spec: JobSpec) -> dict:
    """The spec every trial starts from, as a dict, with paths made absolute (trials run in their own folders)."""
    raw = copy.deepcopy(asdict(spec))
    raw["output_dir"] = storage.absolute(spec.output_dir)
    raw["data"]["shards"] = storage.absolute(spec.shards_location)
    raw["tune"]["space"] = str(resolve_space_path(spec.tune.space))
    if spec.train.storage_path:
        raw["train"]["storage_path"] = storage.absolute(spec.train.storage_path)
    return raw


def starting_model(spec: JobSpec, tune_dir: Location, texts) -> str:
    """The model every trial starts from; built once (a tiny preset) and reused when the search resumes."""
    layout = TuneLayout(tune_dir)
    record = layout.base_record
    if record.is_file():
        return json.loads(record.read_text())["model_source"]
    source = initial_model_in(build_recipe(spec), layout.base, texts)
    record.write_text(json.dumps({"model_source": source}))
    return source
