"""Build, run and resume the Ray Tune search: a ``Tuner`` over the trial function, ASHA on optimizer steps.

Tune keeps its experiment in the tune stage's folder (:class:`medvl.runs.TuneLayout`). When that folder holds
an experiment, the search is restored (``Tuner.restore``) instead of started: finished trials keep their results
and are not rerun, unfinished and errored ones run again. A settings file records what the search was started
with; a changed spec or space is refused rather than silently mixed into the old experiment.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from medvl.runs import SEARCH_DIR, TuneLayout
from medvl.spec import JobSpec, SpecError
from medvl.storage import Location
from medvl.tune.space import Dimension, grid_size, to_ray_tune
from medvl.tune.cleanup import FreeEndedTrials
from medvl.tune.trial import run_trial

TRIAL_DRIVER_CPUS = 0.01  # the trial actor only waits on its Train run; 0 is rejected by Tune


@dataclass
class SearchOutcome:
    results: Any  # ray.tune.ResultGrid
    statuses: dict[str, str]  # trial id → status as saved (RUNNING/PENDING: unfinished, rerun on resume)
    complete: bool  # False: interrupted (rerun the same command to resume)
    restored: bool


def training_cpus(spec: JobSpec) -> float:
    """CPUs one trial trains with (its Train workers', or its own process's when it trains in process)."""
    return spec.tune.cpus_per_trial or spec.train.workers * spec.train.cpus_per_worker


def trial_cpus(spec: JobSpec) -> float:
    """CPUs one trial holds: its training plus Ray Data's reservation (see trainer.check_cpu_budget)."""
    from medvl.data.pipeline import READ_CPUS

    data = 2 * spec.data.preprocess_workers * spec.data.preprocess_cpus + READ_CPUS
    return training_cpus(spec) + data + TRIAL_DRIVER_CPUS


def trial_checkpointing(spec: JobSpec) -> dict:
    """Tune's settings for trials that train in process: the checkpoints kept (as ``trainer.run_config`` keeps a
    Train run's) and how often a failed trial restarts from its last one."""
    from ray import tune

    return {
        "checkpoint_config": tune.CheckpointConfig(num_to_keep=spec.train.num_checkpoints_to_keep,
                                                   checkpoint_score_attribute="val_loss",
                                                   checkpoint_score_order="min"),
        "failure_config": tune.FailureConfig(max_failures=spec.train.max_failures),
    }


def concurrency(spec: JobSpec, cluster: dict[str, float]) -> int:
    """``tune.max_concurrent_trials``, or as many trials as the cluster's CPUs (and GPUs) hold at once."""
    cpus, per_trial = cluster.get("CPU", 0), trial_cpus(spec)
    fits = math.floor(cpus / per_trial + 1e-9)
    if spec.tune.gpus_per_trial:
        fits = min(fits, math.floor(cluster.get("GPU", 0) / spec.tune.gpus_per_trial + 1e-9))
    wanted = spec.tune.max_concurrent_trials
    if fits < 1 or wanted > fits:
        raise SpecError(
            f"tune.max_concurrent_trials: expected at most {max(fits, 0)} (each trial holds {per_trial:g} CPUs"
            + (f" and {spec.tune.gpus_per_trial:g} GPUs" if spec.tune.gpus_per_trial else "")
            + f"; the cluster has {cpus:g} CPUs), got {wanted or 'the default'}"
        )
    return wanted or fits


def search_settings(spec: JobSpec, space: list[Dimension]) -> dict:
    """What defines a search: the trial spec's sections and the space (not Ray's address, the stage list or where
    the search is tracked)."""
    raw = asdict(spec)
    for key in ("stages", "ray", "output_dir", "tracking"):
        raw.pop(key)
    raw["tune"].pop("max_concurrent_trials")
    return {"spec": raw, "space": [asdict(d) for d in space]}


def run_search(spec: JobSpec, space: list[Dimension], tune_dir: Location, base: dict, model_source: str,
               max_t: int, callbacks: list | None = None, datasets: dict | None = None,
               in_process: bool = False) -> SearchOutcome:
    """Start the search, or resume the one in ``tune_dir``; returns when every trial is done or on interrupt.

    ``in_process``: the trials train in their own process (:func:`medvl.tune.trial.runs_in_trial`): each holds
    its training CPUs itself, and Tune keeps its checkpoints and restarts it after a failure (with Ray Train
    inside a trial, Train does both).

    ``callbacks``: extra Tune callbacks for a new search (the tests use one to interrupt it). A restored search
    runs with the callbacks it was started with: Tune restores them with the experiment, and Ray (tested on
    2.60) has no public API to replace them, so callbacks must survive pickling (see ``FreeEndedTrials``).
    """
    import ray
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, tune_dir=tune_dir, model_source=model_source, datasets=datasets,
                             in_process=in_process),
        {"cpu": TRIAL_DRIVER_CPUS + (training_cpus(spec) if in_process else 0)},
    )
    layout = TuneLayout(tune_dir)
    experiment = layout.experiment
    settings = json.loads(json.dumps(search_settings(spec, space), default=str))
    settings_path = layout.settings
    # Tune reaches its experiment through the stage folder's filesystem (S3 included): Tuner.restore works
    # from wherever the search was started.
    filesystem = None if tune_dir.is_local else tune_dir.fs
    restored = tune.Tuner.can_restore(experiment.path, storage_filesystem=filesystem)
    if restored:
        previous = json.loads(settings_path.read_text()) if settings_path.is_file() else None
        if previous != settings:
            raise SpecError(f"tune: {experiment} holds a search started with other settings; remove {tune_dir} "
                            "or choose another output_dir to start a new one")
        print(f"[medvl tune] resuming the search in {experiment}", flush=True)
        tuner = tune.Tuner.restore(experiment.path, trainable, resume_unfinished=True, restart_errored=True,
                                   storage_filesystem=filesystem)
    else:
        tune_dir.mkdir()
        settings_path.write_text(json.dumps(settings, indent=2))
        tuner = tune.Tuner(
            trainable,
            param_space=to_ray_tune(space),
            tune_config=tune.TuneConfig(
                metric=spec.tune.metric,
                mode=spec.tune.mode,
                num_samples=spec.tune.num_samples,
                search_alg=search_algorithm(spec, concurrency(spec, ray.cluster_resources())),
                scheduler=scheduler(spec, max_t),
                trial_dirname_creator=lambda trial: trial.trial_id,
                # A trial training in process imports torch, transformers and the recipe (seconds each on a busy
                # machine): the next trial reuses its process, and those imports, instead of starting a new one.
                reuse_actors=in_process,
            ),
            run_config=tune.RunConfig(name=SEARCH_DIR, storage_path=tune_dir.path, storage_filesystem=filesystem,
                                      callbacks=[FreeEndedTrials(), *(callbacks or [])], verbose=1,
                                      **(trial_checkpointing(spec) if in_process else {})),
        )
    results = tuner.fit()
    statuses = saved_statuses(experiment)
    # Trials are created lazily (one per free slot): an interrupted search may not have created them all.
    complete = len(statuses) >= expected_trials(spec, space) and all(
        s in ("TERMINATED", "ERROR") for s in statuses.values())
    return SearchOutcome(results, statuses, complete, restored)


def expected_trials(spec: JobSpec, space: list[Dimension]) -> int:
    """Grid and random search: every grid point ``num_samples`` times; Optuna: ``num_samples`` trials."""
    return spec.tune.num_samples * (1 if spec.tune.search_alg == "optuna" else grid_size(space))


def saved_statuses(experiment: Location) -> dict[str, str]:
    """Each trial's status as Tune saved it, i.e. as a restore will see it.

    After an interrupt Tune stops the running trials and marks them TERMINATED in memory, but the state it
    saved first still says RUNNING (and a restore reruns them): the saved state is the one to trust.
    """
    # Tune's own rule: the newest session's file by name (a resumed run rewrites the old files too, so not mtime)
    states = experiment.glob("experiment_state-*.json")  # sorted by name
    if not states:
        return {}
    saved = json.loads(states[-1].read_text())
    statuses = {}
    for trial_json, _ in saved["trial_data"]:
        trial = json.loads(trial_json)
        statuses[trial["trial_id"]] = trial["status"]
    return statuses


def search_algorithm(spec: JobSpec, max_concurrent: int):
    """The searcher, holding the concurrency limit (Tune ignores ``max_concurrent_trials`` for grid/random)."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if spec.tune.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=spec.train.seed), max_concurrent=max_concurrent)
    return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=spec.train.seed)


def scheduler(spec: JobSpec, max_t: int):
    """ASHA on the loop's ``step`` (optimizer steps); None = FIFO, every trial runs to its end."""
    if spec.tune.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    if spec.tune.grace_period > max_t:
        raise SpecError(f"tune.grace_period: expected at most the trials' {max_t} planned steps "
                        f"(see tune.max_steps), got {spec.tune.grace_period}")
    return ASHAScheduler(time_attr="step", max_t=max_t, grace_period=spec.tune.grace_period,
                         reduction_factor=spec.tune.reduction_factor)
