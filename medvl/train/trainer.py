"""Driver side of a train stage: build the Ray datasets, run ``TorchTrainer``, export the best model.

A train stage writes its model folder (the best checkpoint, lowest validation loss, as a plain HF folder), its
summary (steps, losses, best checkpoint, skipped rows, and what the run cost: wall time, samples/s, tokens/s,
trainable / total parameters, peak memory) and Ray Train's run folder (all kept checkpoints) where
:mod:`medvl.runs` says. While it trains, the driver shows the workers' progress and logs their step metrics
(:mod:`medvl.train.reporting`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from medvl import storage
from medvl.data.pipeline import preprocessed, preprocessed_here, read_split
from medvl.data.position import POSITION_FILE, ROW_KEY
from medvl.data.shards import MANIFEST, read_manifest, shard_paths
from medvl.data.skips import skipped_counts, skipped_since
from medvl.models.base import Recipe
from medvl.models.cache import initial_model_in, model_filesystem, publishing
from medvl.models.registry import build_recipe
from medvl.runs import RUN_SPEC_FILE, RunLayout, write_summary
from medvl.spec import JobSpec, StageSpec
from medvl.tracking.mlflow_store import StageLog
from medvl.tracking.progress import BoardWatcher, Progress, stage_label, start_board
from medvl.storage import Location
from medvl.train.deepspeed_file import config_file_digest, read_config_file
from medvl.train.engines import consolidate, is_deepspeed_checkpoint
from medvl.train.loop import TRAINING_STATE, train_loop_per_worker
from medvl.train.reporting import TrainingView

# What the last report of the workers says the run cost (see medvl.train.reporting), copied into the summary.
COST_FIELDS = ("train_time_s", "samples_trained", "samples_per_s", "tokens_per_s", "step_time_s",
               "trainable_params", "total_params", "trainable_percent", "peak_memory_mb", "peak_gpu_memory_mb",
               "startup_s")


@dataclass
class TrainOutcome:
    model_dir: Location
    summary: dict


@dataclass(frozen=True)
class PreparedStage:
    """What a train stage has ready on the driver side before its loop runs, whichever way it runs (a
    ``TorchTrainer``, or a Tune trial's own process): its folder, data, starting model and planned steps."""

    spec: JobSpec
    stage: StageSpec
    recipe: Callable[[], Recipe]  # built when first needed (see prepare_stage)
    layout: RunLayout
    out: Location  # the stage's folder
    manifest: dict
    model_source: str
    model_fs: pafs.FileSystem | None  # carries the driver's S3 endpoint and keys to workers
    position: tuple[pafs.FileSystem, str] | None  # the run's position file; None with a search's shared datasets
    datasets: dict
    total_steps: int
    skipped_before: dict[str, int]  # the cluster's skip counts before this stage's pipelines were built
    started: float  # time.perf_counter() at the stage's start: its wall time counts from here
    stamps: dict[str, float]  # time.time() marks of the start-up so far (see reporting.StartupClock)

    def loop_config(self, board=None) -> dict:
        """The loop's config (:func:`loop_config`); the driver side's start-up ends now."""
        return loop_config(self.spec, self.model_source, self.model_fs, self.total_steps, self.position, board,
                           self.stamps | {"driver": time.time()})

    def summary(self, model_dir: Location, metrics: dict, best_val_loss: float) -> dict:
        return stage_summary(self.spec, self.stage, self.model_source, model_dir, self.total_steps, metrics,
                             best_val_loss, self.skipped_before, self.started)

    def export(self, checkpoint: ray.train.Checkpoint, metrics: dict, best_val_loss: float) -> TrainOutcome:
        """The best checkpoint as the stage's model folder, then the summary (last: it marks the stage done)."""
        model_dir = self.layout.model(self.stage.name)
        export_checkpoint(checkpoint, model_dir, self.recipe())
        summary = self.summary(model_dir, metrics, best_val_loss)
        write_summary(self.out, summary)
        return TrainOutcome(model_dir, summary)


def prepare_stage(spec: JobSpec, stage: StageSpec, start_from: str | None, shared_datasets: dict | None,
                  started_at: float | None, ray_train_run: bool) -> PreparedStage:
    """The driver side of a train stage up to its loop: the stage's folder, the manifest, the starting model
    (``start_from``, else the recipe's initial model built in the stage's folder), the datasets (the stage's own
    pipelines, or a search's ``shared_datasets``) and the planned steps.

    ``ray_train_run``: Ray Train will run the stage and resume whatever its run folder holds, so that folder is
    claimed first (:func:`claim_run_folder`); otherwise (a Tune trial, which Tune restores itself) only a stale
    summary goes. ``started_at`` (``time.time()``): when the caller started (a Tune trial), so that the start-up
    the loop reports counts from there.
    """
    started, stage_stamp = time.perf_counter(), time.time()
    # Built when first needed: importing a recipe's model code takes seconds, and a Tune trial with the search's
    # shared data and base model needs it only to export its model after training (its workers build their own).
    recipe = functools.cache(functools.partial(build_recipe, spec))
    layout = RunLayout.for_spec(spec)
    out = layout.stage(stage.name)
    out.mkdir()
    if ray_train_run:
        claim_run_folder(spec, stage.name)
    else:
        layout.summary(stage.name).unlink(missing_ok=True)  # present again only once this run finishes
    endpoint = spec.data.endpoint_url
    manifest = read_manifest(spec.shards_location, endpoint)
    model_source = start_from or initial_model_in(recipe(), out, lambda: training_texts(spec))
    skipped_before = skipped_counts()  # before the pipelines start: what they skip is this stage's
    model_fs = model_filesystem(model_source, endpoint)
    if shared_datasets is None:
        position = storage.filesystem_for(position_file_location(spec, stage.name), endpoint)  # fs carries S3 keys
        datasets = training_datasets(spec, recipe(), model_source, position)
    else:
        position, datasets = None, shared_datasets
    return PreparedStage(
        spec=spec, stage=stage, recipe=recipe, layout=layout, out=out, manifest=manifest, model_source=model_source,
        model_fs=model_fs, position=position, datasets=datasets,
        total_steps=planned_steps(manifest["counts"]["train"], spec), skipped_before=skipped_before,
        started=started, stamps=({"start": started_at} if started_at else {}) | {"stage": stage_stamp},
    )


def run_train_stage(spec: JobSpec, stage: StageSpec, start_from: str | None = None, callbacks: list | None = None,
                    resources_per_worker: dict | None = None, log: StageLog | None = None,
                    show_progress: bool = True, shared_datasets: dict | None = None,
                    started_at: float | None = None) -> TrainOutcome:
    """Train ``spec``'s model (from ``start_from``, a model folder, when given) and export the best checkpoint.

    ``callbacks`` go to Ray Train's ``RunConfig`` (a Tune trial passes ``TuneReportCallback``);
    ``resources_per_worker`` replaces ``{"CPU": train.cpus_per_worker}`` (a Tune trial's fractional GPUs);
    ``log`` gets the step metrics; ``show_progress`` False (a Tune trial: the search shows its own) draws nothing
    and leaves the workers without a progress board. ``shared_datasets`` (a search's trials: see
    :func:`shared_training_datasets`) replaces the stage's own pipelines. ``started_at`` (``time.time()``): when
    the caller started (a Tune trial), so that the start-up the workers report counts from there.
    """
    prepared = prepare_stage(spec, stage, start_from, shared_datasets, started_at, ray_train_run=True)
    settings = spec.train
    check_cpu_budget(spec)
    board = start_board() if show_progress else None
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=prepared.loop_config(board),
        scaling_config=ScalingConfig(
            num_workers=settings.workers,
            use_gpu=settings.use_gpu,
            resources_per_worker=resources_per_worker or {"CPU": settings.cpus_per_worker},
        ),
        run_config=run_config(spec, stage.name, callbacks),
        datasets=prepared.datasets,
    )
    if show_progress:  # (a search's trials would print one such line each)
        print(f"[medvl train] {stage.name}: {prepared.manifest['counts']['train']} training rows, "
              f"{prepared.total_steps} optimizer steps planned, {settings.workers} worker(s)", flush=True)
    result = fit_showing_progress(trainer, board, spec, stage.name, prepared.total_steps, log)
    best = result.get_best_checkpoint(metric="val_loss", mode="min") if result.best_checkpoints else None
    if best is None:
        raise RuntimeError(f"train stage {stage.name!r} reported no checkpoint")
    return prepared.export(best, result.metrics, min(m["val_loss"] for _, m in result.best_checkpoints))


def run_train_in_trial(spec: JobSpec, stage: StageSpec, start_from: str, shared_datasets: dict | None = None,
                       started_at: float | None = None) -> TrainOutcome:
    """A one-worker train stage run in this process, a Tune trial's (see :mod:`medvl.tune.trial` for when): the
    loop of :func:`run_train_stage` with the same datasets, checkpoints and export, reporting through Tune
    (:class:`medvl.train.session.TrialSession`) instead of a ``TorchTrainer``'s controller and worker processes.

    ``start_from``: the search's base model; ``shared_datasets`` and ``started_at`` as for :func:`run_train_stage`.
    Checkpoints are Tune's (its ``CheckpointConfig`` and ``FailureConfig``: see :mod:`medvl.tune.search`)."""
    from medvl.train.loop import run_loop
    from medvl.train.session import TrialSession

    prepared = prepare_stage(spec, stage, start_from, shared_datasets, started_at, ray_train_run=False)
    best_dir = scratch_folder(prepared.out) / "best_checkpoint"
    config = prepared.loop_config()
    session = TrialSession(prepared.datasets, best_dir)
    try:
        run_loop(config, session)
    except SystemExit:  # Tune stopped the trial (ASHA): no export, so no copy to keep (a failure keeps it)
        shutil.rmtree(best_dir.parent, ignore_errors=True)
        raise
    if not best_dir.is_dir():
        raise RuntimeError(f"train stage {stage.name!r} reported no checkpoint")
    outcome = prepared.export(ray.train.Checkpoint.from_directory(str(best_dir)), session.last_metrics,
                              session.best_val_loss)
    shutil.rmtree(best_dir.parent, ignore_errors=True)
    return outcome


def scratch_folder(out: Location) -> Path:
    """A local folder of this stage's (a restarted trial on the same node finds it again): inside the stage's own
    folder when that is local, else in the temporary directory, named by the stage folder's URL."""
    if out.is_local:
        return Path(out.path) / ".scratch"
    return Path(tempfile.gettempdir()) / "medvl-scratch" / hashlib.sha256(out.url.encode()).hexdigest()[:16]


def loop_config(spec: JobSpec, model_source: str, model_fs, total_steps: int, position, board,
                startup_stamps: dict[str, float]) -> dict:
    """What the training loop (:func:`medvl.train.loop.run_loop`) is given, wherever it runs."""
    settings = spec.train
    return {
        "spec": spec,
        "model_source": model_source,
        "model_filesystem": model_fs,
        "total_steps": total_steps,
        "position_file": position,
        "torch_threads": settings.torch_threads or max(1, math.ceil(settings.cpus_per_worker)),
        "progress_board": board,
        "startup_stamps": startup_stamps,
        # The contents, read here: a worker never opens the path (its node may not have the file).
        "deepspeed_file": read_config_file(settings.deepspeed.config_file) if settings.deepspeed.config_file
        else None,
    }


def stage_summary(spec: JobSpec, stage: StageSpec, model_source: str, model_dir: Location, total_steps: int,
                  metrics: dict, best_val_loss: float, skipped_before: dict, started: float) -> dict:
    """The train stage's summary, from the loop's last report (``metrics``)."""
    return {
        "stage": stage.name,
        "model_source": model_source,
        "model_dir": str(model_dir),
        "planned_steps": total_steps,
        "steps": int(metrics["step"]),
        "stopped_early": bool(metrics["stopped_early"]),
        "best_val_loss": best_val_loss,
        "history": metrics["history"],
        "epochs": metrics["epochs"],
        "resumed_at_steps": metrics["resumed_at_steps"],
        "skipped": skipped_since(skipped_before),
        "recipe": spec.model.recipe,
        "finetune": spec.train.finetune,
        "workers": spec.train.workers,
        "wall_time_s": time.perf_counter() - started,
        **{key: metrics[key] for key in COST_FIELDS if key in metrics},
    }


def training_datasets(spec: JobSpec, recipe: Recipe, model_source: str,
                      position: tuple[pafs.FileSystem, str] | None = None) -> dict:
    """The train and val pipelines: shard rows decoded and tokenised by a pool of Ray Data actors, streamed.

    ``position`` (filesystem, path): the run's record of rows trained this epoch (see :mod:`medvl.data.position`).
    """
    location, endpoint = spec.shards_location, spec.data.endpoint_url
    model_fs = model_filesystem(model_source, endpoint)  # carries the driver's S3 endpoint and keys to workers
    factory = recipe.preprocessor_factory(model_source, model_fs)  # torch-free where the recipe has such a form
    preprocess = functools.partial(
        preprocessed, preprocessor_factory=factory,
        concurrency=spec.data.preprocess_workers, num_cpus=spec.data.preprocess_cpus,
    )
    columns = list(recipe.tensor_columns)  # ids and texts stay out of the training batches
    return {
        "train": preprocess(read_split(location, "train", endpoint, shuffle="files"), keep=[*columns, ROW_KEY],
                            position_file=position),
        "val": preprocess(read_split(location, "val", endpoint), keep=columns),
    }


# A search shares its preprocessed splits only while they take at most this share of Ray's object store.
SHARED_DATA_STORE_SHARE = 0.2


def shared_training_datasets(spec: JobSpec, recipe: Recipe, model_source: str, rows: int) -> dict | None:
    """The train and val splits preprocessed once and held in Ray's object store, for every trial of a search.

    Preprocessing depends on the data and the base model, never on a trial's values, so a search can decode and
    tokenise once, here in the driver (which has the model's libraries loaded already), instead of starting a
    pipeline (read tasks, a preprocessing actor that imports those libraries) in every trial: on the 2-CPU machine
    that start was a third to a half of a tiny trial's time to its first step.
    Only when the tensors of ``rows`` rows (pixels as float32, the estimate that matters) fit in
    ``SHARED_DATA_STORE_SHARE`` of the object store; otherwise None and each trial streams its own. The shared
    training split is shuffled by block order each epoch (and by the loop's buffer); a trial whose worker group
    restarts resumes at its checkpoint's step but may see rows of the epoch again (no position filter).
    """
    import ray

    data = spec.data
    estimate = rows * (3 * data.image_size**2 * 4 + 16 * (data.max_text_length + data.max_question_length))
    store = ray.cluster_resources().get("object_store_memory", 0)
    if estimate > SHARED_DATA_STORE_SHARE * store:
        return None
    location, endpoint = spec.shards_location, data.endpoint_url
    preprocess = recipe.preprocessor_factory(model_source, model_filesystem(model_source, endpoint))()
    columns = list(recipe.tensor_columns)
    return {
        "train": preprocessed_here(location, "train", preprocess, [*columns, ROW_KEY], endpoint).randomize_block_order(),
        "val": preprocessed_here(location, "val", preprocess, columns, endpoint),
    }


def fit_showing_progress(trainer: TorchTrainer, board, spec: JobSpec, name: str, total_steps: int,
                         log: StageLog | None):
    """``trainer.fit()``, with the workers' posts drawn and logged while it runs (nothing without a board)."""
    if board is None:
        return trainer.fit()
    progress = Progress(stage_label("train", name), total=total_steps, unit="steps",
                        every_s=spec.tracking.progress_every_s)
    try:
        with BoardWatcher(board, TrainingView(progress, log or StageLog(name))):
            return trainer.fit()
    finally:
        progress.close()


def claim_run_folder(spec: JobSpec, name: str) -> None:
    """Decide between resuming and starting afresh before Ray Train sees the run folder.

    Ray Train resumes any run whose folder holds checkpoints. That is what a crashed run wants, and only that:
    a stage that finished (its summary exists), or whose folder holds no checkpoint, starts afresh; an unfinished
    one is resumed only when it is the same run. What a run is (the spec, a digest of the prepared data's
    manifest, a digest of the DeepSpeed config file's contents) is written with its checkpoints,
    ``<storage>/<name>/run_spec.json``, and copied to the stage folder's ``run_spec.json``. A run folder with checkpoints but
    without that record, or with a different one, is refused naming what changed, rather than resumed as a silent
    mix of two configurations or two datasets.
    """
    location = storage.join(storage_location(spec), name)
    fs, run_dir = storage.filesystem_for(location, spec.data.endpoint_url)
    identity = run_identity(spec)
    layout = RunLayout.for_spec(spec)
    summary, run_spec = layout.summary(name), layout.run_spec(name)
    record = storage.join(run_dir, RUN_SPEC_FILE)
    entries = fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    has_checkpoints = any(entry.base_name.startswith("checkpoint") for entry in entries)
    if entries and (summary.exists() or not has_checkpoints):
        fs.delete_dir(run_dir)  # finished (its best model is exported under `out`), or nothing to resume
    elif has_checkpoints:
        before = json.loads(storage.read_bytes(fs, record)) if storage.exists(fs, record) else None
        changes = identity_changes(before, identity)
        if changes:
            raise ValueError(
                f"{location} holds an unfinished run of stage {name!r} {changes}: rerun with the same settings and "
                "data to resume it, or delete that folder to start afresh"
            )
    summary.unlink(missing_ok=True)  # present again only once this run finishes
    text = json.dumps(identity, sort_keys=True, indent=1)
    storage.write_bytes_atomic(fs, record, text.encode())
    run_spec.write_text(text)


def run_identity(spec: JobSpec) -> dict:
    """What a resumed run must match: the spec, the prepared data (its manifest) and the DeepSpeed file's contents."""
    try:
        fs, root = storage.filesystem_for(spec.shards_location, spec.data.endpoint_url)
        manifest = hashlib.sha256(storage.read_bytes(fs, storage.join(root, MANIFEST))).hexdigest()
    except (FileNotFoundError, OSError):
        manifest = ""  # nothing prepared yet: the stage fails on it next
    settings = dataclasses.asdict(spec)
    for section in ("tracking", "compare"):  # where a run is logged and compared is not what it trains
        settings.pop(section)
    return {
        "spec": json.loads(json.dumps(settings, default=str)),
        "data_manifest_sha256": manifest,
        "deepspeed_config_file_sha256": config_file_digest(spec.train.deepspeed.config_file),
    }


def identity_changes(before: dict | None, now: dict) -> str:
    """"" when ``before`` is the same run as ``now``; else what differs, in words."""
    if not isinstance(before, dict) or "spec" not in before:
        return f"with no record of its settings and data ({RUN_SPEC_FILE} is missing or from an older medvl)"
    changes = [f"{key} {old!r} → {new!r}" for key, old, new in _differences(before["spec"], now["spec"])]
    if len(changes) > 5:
        changes = changes[:5] + [f"and {len(changes) - 5} more"]
    what = [f"with other settings ({', '.join(changes)})"] if changes else []
    if before.get("data_manifest_sha256") != now["data_manifest_sha256"]:
        what.append(f"on other data (the manifest at {now['spec']['data']['shards'] or 'the shards'} changed)")
    if before.get("deepspeed_config_file_sha256") != now["deepspeed_config_file_sha256"]:
        what.append("with another train.deepspeed.config_file (its contents changed)")
    return " and ".join(what)


def _differences(old, new, path: str = ""):
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            yield from _differences(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
    elif old != new:
        yield path, old, new


def check_cpu_budget(spec: JobSpec) -> None:
    """Fail fast, instead of hanging, when Train workers would leave Ray Data no CPU to read with."""
    import ray

    from medvl.data.pipeline import READ_CPUS

    train = spec.train.workers * spec.train.cpus_per_worker
    data = 2 * spec.data.preprocess_workers * spec.data.preprocess_cpus + READ_CPUS  # train + val pools, one read
    available = ray.cluster_resources().get("CPU", 0)
    if train + data > available:
        raise ValueError(
            f"train.workers × train.cpus_per_worker ({train:g} CPUs) plus Ray Data's reservation ({data:g}) exceeds "
            f"the cluster's {available:g} CPUs: Ray Data could never read. Lower train.cpus_per_worker "
            "(fractions are fine; train.torch_threads sets the threads) or add nodes."
        )


def planned_steps(train_rows: int, spec: JobSpec) -> int:
    settings = spec.train
    micro_batches = math.ceil(train_rows / (settings.batch_size * settings.workers))
    steps = max(1, micro_batches // settings.grad_accum) * settings.epochs
    return min(steps, settings.max_steps) if settings.max_steps else steps


def storage_location(spec: JobSpec) -> str:
    """Where Ray Train keeps this job's runs: ``train.storage_path`` or ``<output_dir>/checkpoints``."""
    return spec.train.storage_path or str(RunLayout.for_spec(spec).checkpoints)


def position_file_location(spec: JobSpec, name: str) -> str:
    """The run's record of rows trained this epoch, beside its checkpoints (shared storage on a cluster)."""
    return storage.join(storage_location(spec), name, POSITION_FILE)


def run_config(spec: JobSpec, name: str, callbacks: list | None = None) -> RunConfig:
    storage_path = storage_location(spec)
    filesystem = None
    if storage.is_remote(storage_path):
        filesystem, storage_path = storage.filesystem_for(storage_path, spec.data.endpoint_url)
    return RunConfig(
        name=name,
        storage_path=storage_path,
        storage_filesystem=filesystem,
        checkpoint_config=CheckpointConfig(
            num_to_keep=spec.train.num_checkpoints_to_keep,
            checkpoint_score_attribute="val_loss",
            checkpoint_score_order="min",
        ),
        failure_config=FailureConfig(max_failures=spec.train.max_failures),
        callbacks=callbacks,
    )


def export_checkpoint(checkpoint: ray.train.Checkpoint, model_dir: Location, recipe: Recipe | None = None) -> None:
    """Write a checkpoint's model as a plain HF folder (ZeRO shards consolidated), replacing ``model_dir`` (local:
    atomically; on object storage: uploaded).

    The resume state (optimizer, counters) stays behind: the folder is what ``from_pretrained`` /
    ``PeftModel.from_pretrained`` and ``medvl eval`` load.
    """
    with publishing(model_dir) as staging, checkpoint.as_directory() as folder:
        if is_deepspeed_checkpoint(Path(folder)):
            if recipe is None:
                raise ValueError(f"{folder} holds ZeRO shards: exporting it needs the recipe that trained it")
            consolidate(Path(folder), recipe, staging)
        else:
            shutil.copytree(folder, staging, ignore=shutil.ignore_patterns(TRAINING_STATE))


def training_texts(spec: JobSpec):
    """Every target text of the training split (for training a tiny tokenizer), read column-wise."""
    location, endpoint = spec.shards_location, spec.data.endpoint_url
    manifest = read_manifest(location, endpoint)
    fs, _ = storage.filesystem_for(location, endpoint)
    for path in shard_paths(manifest, location, "train", endpoint):
        table = pq.read_table(path, filesystem=fs, columns=["text", "question", "answer"])
        for column in ("text", "question", "answer"):
            yield from (t for t in table.column(column).to_pylist() if t)
