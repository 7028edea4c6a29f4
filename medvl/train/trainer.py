"""Driver side of a train stage: build the Ray datasets, run ``TorchTrainer``, export the best model.

A train stage writes its model folder (the best checkpoint, lowest validation loss, as a plain HF folder), its
summary (steps, losses, best checkpoint, skipped rows) and Ray Train's run folder (all kept checkpoints) where
:mod:`medvl.runs` says.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from medvl.data import storage
from medvl.data.pipeline import preprocessed, read_split
from medvl.data.position import POSITION_FILE, ROW_KEY
from medvl.data.shards import read_manifest, shard_paths
from medvl.data.skips import skipped_counts, skipped_since
from medvl.models.base import Recipe
from medvl.models.registry import build_recipe
from medvl.runs import RunLayout, write_summary
from medvl.spec import JobSpec, StageSpec
from medvl.train.engines import consolidate, is_deepspeed_checkpoint
from medvl.train.loop import TRAINING_STATE, train_loop_per_worker


@dataclass
class TrainOutcome:
    model_dir: Path
    summary: dict


def run_train_stage(spec: JobSpec, stage: StageSpec, start_from: str | None = None, callbacks: list | None = None,
                    resources_per_worker: dict | None = None) -> TrainOutcome:
    """Train ``spec``'s model (from ``start_from``, a model folder, when given) and export the best checkpoint.

    ``callbacks`` go to Ray Train's ``RunConfig`` (a Tune trial passes ``TuneReportCallback``);
    ``resources_per_worker`` replaces ``{"CPU": train.cpus_per_worker}`` (a Tune trial's fractional GPUs).
    """
    recipe = build_recipe(spec)
    layout = RunLayout.of(spec.output_dir)
    out = layout.stage(stage.name)
    out.mkdir(parents=True, exist_ok=True)
    claim_run_folder(spec, stage.name)
    location, endpoint = spec.shards_location, spec.data.endpoint_url
    manifest = read_manifest(location, endpoint)
    model_source = start_from or recipe.initial_model(out, lambda: training_texts(spec))
    skipped_before = skipped_counts()

    factory = functools.partial(recipe.preprocessor, model_source)
    preprocess = functools.partial(
        preprocessed, preprocessor_factory=factory,
        concurrency=spec.data.preprocess_workers, num_cpus=spec.data.preprocess_cpus,
    )
    columns = list(recipe.tensor_columns)  # ids and texts stay out of the training batches
    position = storage.filesystem_for(position_file_location(spec, stage.name), endpoint)  # fs carries S3 keys
    datasets = {
        "train": preprocess(read_split(location, "train", endpoint, shuffle="files"), keep=[*columns, ROW_KEY],
                            position_file=position),
        "val": preprocess(read_split(location, "val", endpoint), keep=columns),
    }
    settings = spec.train
    check_cpu_budget(spec)
    total_steps = planned_steps(manifest["counts"]["train"], spec)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "spec": spec,
            "model_source": model_source,
            "total_steps": total_steps,
            "position_file": position,
            "torch_threads": settings.torch_threads or max(1, math.ceil(settings.cpus_per_worker)),
        },
        scaling_config=ScalingConfig(
            num_workers=settings.workers,
            use_gpu=settings.use_gpu,
            resources_per_worker=resources_per_worker or {"CPU": settings.cpus_per_worker},
        ),
        run_config=run_config(spec, stage.name, callbacks),
        datasets=datasets,
    )
    print(f"[medvl train] {stage.name}: {manifest['counts']['train']} training rows, "
          f"{total_steps} optimizer steps planned, {settings.workers} worker(s)", flush=True)
    result = trainer.fit()
    best = result.get_best_checkpoint(metric="val_loss", mode="min") if result.best_checkpoints else None
    if best is None:
        raise RuntimeError(f"train stage {stage.name!r} reported no checkpoint")
    model_dir = layout.model(stage.name)
    export_checkpoint(best, model_dir, recipe)
    summary = {
        "stage": stage.name,
        "model_source": model_source,
        "model_dir": str(model_dir),
        "planned_steps": total_steps,
        "steps": int(result.metrics["step"]),
        "stopped_early": bool(result.metrics["stopped_early"]),
        "best_val_loss": min(m["val_loss"] for _, m in result.best_checkpoints),
        "history": result.metrics["history"],
        "epochs": result.metrics["epochs"],
        "resumed_at_steps": result.metrics["resumed_at_steps"],
        **{key: result.metrics[key] for key in ("trainable_params", "total_params", "trainable_percent")},
        "skipped": skipped_since(skipped_before),
    }
    write_summary(out, summary)
    return TrainOutcome(model_dir, summary)


def claim_run_folder(spec: JobSpec, name: str) -> None:
    """Decide between resuming and starting afresh before Ray Train sees the run folder.

    Ray Train resumes any run whose folder holds checkpoints. That is what a crashed run wants, and only that:
    a stage that finished (its summary exists) starts afresh, and an unfinished one is resumed only with the
    same settings; with other settings it is an error rather than a silent mix of two configurations.
    """
    fs, run_dir = storage.filesystem_for(storage.join(storage_location(spec), name), spec.data.endpoint_url)
    settings = json.dumps(dataclasses.asdict(spec), sort_keys=True, default=str)
    has_run = fs.get_file_info(run_dir).type == pafs.FileType.Directory
    layout = RunLayout.of(spec.output_dir)
    summary, run_spec = layout.summary(name), layout.run_spec(name)
    if has_run and summary.exists():
        fs.delete_dir(run_dir)  # a finished run: its best model is already exported under `out`
    elif has_run and run_spec.exists() and run_spec.read_text() != settings:
        raise ValueError(
            f"{storage.join(storage_location(spec), name)} holds an unfinished run of stage {name!r} with other "
            "settings: rerun with the same settings to resume it, or delete that folder to start afresh"
        )
    summary.unlink(missing_ok=True)  # present again only once this run finishes
    run_spec.write_text(settings)


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
    return spec.train.storage_path or str(RunLayout.of(spec.output_dir).checkpoints)


def position_file_location(spec: JobSpec, name: str) -> str:
    """The run's record of rows trained this epoch, beside its checkpoints (shared storage on a cluster)."""
    return storage.join(storage_location(spec), name, POSITION_FILE)


def run_config(spec: JobSpec, name: str, callbacks: list | None = None) -> RunConfig:
    storage_path = storage_location(spec)
    filesystem = None
    if storage.is_s3(storage_path):
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


def export_checkpoint(checkpoint: ray.train.Checkpoint, model_dir: Path, recipe: Recipe | None = None) -> None:
    """Write a checkpoint's model as a plain HF folder (ZeRO shards consolidated), replacing ``model_dir`` atomically.

    The resume state (optimizer, counters) stays behind: the folder is what ``from_pretrained`` /
    ``PeftModel.from_pretrained`` and ``medvl eval`` load.
    """
    staging = model_dir.with_name(model_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with checkpoint.as_directory() as folder:
        if is_deepspeed_checkpoint(Path(folder)):
            if recipe is None:
                raise ValueError(f"{folder} holds ZeRO shards: exporting it needs the recipe that trained it")
            consolidate(Path(folder), recipe, staging)
        else:
            shutil.copytree(folder, staging, ignore=shutil.ignore_patterns(TRAINING_STATE))
    shutil.rmtree(model_dir, ignore_errors=True)
    staging.rename(model_dir)


def training_texts(spec: JobSpec):
    """Every target text of the training split (for training a tiny tokenizer), read column-wise."""
    location, endpoint = spec.shards_location, spec.data.endpoint_url
    manifest = read_manifest(location, endpoint)
    fs, _ = storage.filesystem_for(location, endpoint)
    for path in shard_paths(manifest, location, "train", endpoint):
        table = pq.read_table(path, filesystem=fs, columns=["text", "question", "answer"])
        for column in ("text", "question", "answer"):
            yield from (t for t in table.column(column).to_pylist() if t)
