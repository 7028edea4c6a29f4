"""One trial of a search: the base job spec with the trial's sampled values, trained as one Ray Train run.

The trial function runs inside a Tune trial actor. It builds the trial's ``JobSpec`` (base spec + the sampled
dotted keys) and calls the ordinary train stage with ``TuneReportCallback``, so every validation the loop
reports (``step``, ``val_loss``…) reaches Tune and its scheduler. When ASHA stops a trial, Tune ends the trial
actor and with it the Train controller and workers it owns (their memory goes with them).

Each trial's spec has its own ``output_dir`` inside the tune stage's folder, holding one train stage (its model
and summary, when the trial ran to its end) and its Ray Train run (see :mod:`medvl.runs`). Each start leaves a
record (one object, as object stores cannot append), gathered into the starts log, so a resumed search shows
which trials ran again.
"""
from __future__ import annotations

import copy
import json
import time
from typing import Any

from medvl.runs import TRIAL_STAGE, TuneLayout
from medvl.spec import JobSpec, StageSpec, parse_spec, set_dotted
from medvl.storage import Location


def plain(value: Any) -> Any:
    """Tune may hand numpy scalars (randint); the spec's type checks want Python ints and floats."""
    return value.item() if hasattr(value, "item") else value


def trial_spec(base: dict, config: dict[str, Any], trial_dir: Location) -> JobSpec:
    """The job spec one trial trains: ``base`` (a JobSpec as a dict, paths absolute) with ``config`` set."""
    raw = copy.deepcopy(base)
    for key, value in config.items():
        set_dotted(raw, key, plain(value), where=f"trial {trial_dir.name}")
    tune = raw["tune"]
    train = raw["train"]
    if tune["max_steps"]:
        train["max_steps"] = min(train["max_steps"] or tune["max_steps"], tune["max_steps"])
    if tune["eval_every_steps"]:  # validations are where ASHA judges a trial
        train["eval_every_steps"] = tune["eval_every_steps"]
    if tune["cpus_per_trial"]:
        train["cpus_per_worker"] = tune["cpus_per_trial"] / train["workers"]
    if train["storage_path"]:  # a shared (e.g. S3) location: one run folder per trial inside it
        train["storage_path"] = f"{train['storage_path'].rstrip('/')}/{trial_dir.parent.parent.name}/{trial_dir.name}"
    raw["output_dir"] = str(trial_dir)
    raw["stages"] = [{"kind": "train", "name": TRIAL_STAGE}]
    return parse_spec(raw)


def worker_resources(spec: JobSpec) -> dict[str, float] | None:
    """Train worker resources when the search hands out GPU fractions; None = the trainer's default."""
    gpus = spec.tune.gpus_per_trial
    if not gpus:
        return None
    return {"CPU": spec.train.cpus_per_worker, "GPU": gpus / spec.train.workers}


def run_trial(config: dict[str, Any], base: dict, tune_dir: Location, model_source: str) -> None:
    """The Tune function trainable (wrapped with ``tune.with_parameters`` and ``tune.with_resources``)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from medvl.train.trainer import run_train_stage

    trial_id = ray.tune.get_context().get_trial_id()
    layout = TuneLayout(tune_dir)
    spec = trial_spec(base, config, layout.trial(trial_id))
    started = time.time()
    record = layout.start_records / f"{trial_id}-{time.time_ns()}.json"
    record.write_text(json.dumps({"trial_id": trial_id, "started": started}))
    run_train_stage(spec, StageSpec(kind="train", name=TRIAL_STAGE), start_from=model_source,
                    callbacks=[TuneReportCallback()], resources_per_worker=worker_resources(spec),
                    show_progress=False)  # the search draws its own progress; trials report through Tune


def gather_starts(layout: TuneLayout) -> list[dict]:
    """Every trial start recorded so far, oldest first, also written to the starts log (one JSON line each)."""
    starts = sorted((json.loads(record.read_text()) for record in layout.start_records.glob("*.json")),
                    key=lambda start: start["started"])
    layout.starts.write_text("".join(json.dumps(start) + "\n" for start in starts))
    return starts
