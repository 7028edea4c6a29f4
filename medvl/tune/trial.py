"""One trial of a search: the base job spec with the trial's sampled values, trained by the ordinary training loop.

The trial function runs inside a Tune trial actor. It builds the trial's ``JobSpec`` (base spec + the sampled
dotted keys) and trains it one of two ways, both running :func:`medvl.train.loop.run_loop` and exporting the
same model folder and summary:

* **In the trial's own process** (:func:`runs_in_trial`: one DDP worker on CPU, the search's usual case): the
  loop reads the datasets directly and reports each validation, with its checkpoint, to Tune
  (:class:`medvl.train.session.TrialSession`). Tune's ``FailureConfig`` restarts a failed trial from its last
  checkpoint (:mod:`medvl.tune.search`). Why: a ``TorchTrainer`` inside a trial starts a controller actor and a
  worker actor, each a new process importing Ray and torch, and a process group, before the first step; on the
  2-CPU machine that was ~17 s of a tiny trial's ~23 s start-up (benchmarks/tune_asha.py), three quarters of a
  trial that trains for a few seconds, so ASHA's early stops saved little wall time.
* **Under a ``TorchTrainer``** (several workers, DeepSpeed, GPUs): the ordinary train stage with
  ``TuneReportCallback``, so every validation the loop reports reaches Tune and its scheduler; Ray Train's own
  ``FailureConfig`` restarts its worker group. When ASHA stops such a trial, Tune ends the trial actor and with
  it the Train controller and workers it owns (their memory goes with them).

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


# Searched fields that can take a trial out of the one-worker CPU case (then every trial runs under TorchTrainer).
TRAINER_FIELDS = ("train.workers", "train.strategy", "train.use_gpu", "tune.gpus_per_trial")


def runs_in_trial(example: JobSpec, searched: list[str]) -> bool:
    """Whether a search's trials train in their own process (one DDP worker on CPU, whatever the trial's values)
    rather than under a ``TorchTrainer``."""
    train = example.train
    return (train.workers == 1 and train.strategy != "deepspeed" and not train.use_gpu
            and not example.tune.gpus_per_trial and not any(f in TRAINER_FIELDS for f in searched))


def run_trial(config: dict[str, Any], base: dict, tune_dir: Location, model_source: str,
              datasets: dict | None = None, in_process: bool = False) -> None:
    """The Tune function trainable (wrapped with ``tune.with_parameters`` and ``tune.with_resources``).

    ``datasets``: the search's preprocessed splits, shared by every trial (``trainer.shared_training_datasets``);
    None: the trial streams its own. ``in_process``: train here (see :func:`runs_in_trial`)."""
    started = time.time()  # before the imports: they are part of a trial's start-up
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    layout = TuneLayout(tune_dir)
    spec = trial_spec(base, config, layout.trial(trial_id))
    record = layout.start_records / f"{trial_id}-{time.time_ns()}.json"
    record.write_text(json.dumps({"trial_id": trial_id, "started": started}))
    stage = StageSpec(kind="train", name=TRIAL_STAGE)
    if in_process:
        from medvl.train.trainer import run_train_in_trial

        run_train_in_trial(spec, stage, model_source, shared_datasets=datasets, started_at=started)
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    from medvl.train.trainer import run_train_stage

    run_train_stage(spec, stage, start_from=model_source, callbacks=[TuneReportCallback()],
                    resources_per_worker=worker_resources(spec),
                    show_progress=False,  # the search draws its own progress; trials report through Tune
                    shared_datasets=datasets, started_at=started)


def gather_starts(layout: TuneLayout) -> list[dict]:
    """Every trial start recorded so far, oldest first, also written to the starts log (one JSON line each)."""
    starts = sorted((json.loads(record.read_text()) for record in layout.start_records.glob("*.json")),
                    key=lambda start: start["started"])
    layout.starts.write_text("".join(json.dumps(start) + "\n" for start in starts))
    return starts
