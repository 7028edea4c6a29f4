"""The training loop: run by each of Ray Train's ``TorchTrainer`` workers (Train V2 APIs), or by a one-worker
Tune trial in its own process (:mod:`medvl.train.session` is where the two differ).

One loop serves every recipe: the recipe supplies the loss; this file owns the schedule of training (epochs,
steps, validation, early stopping, checkpoints). Optimisation itself (AdamW, warm-up + cosine decay,
accumulation, clipping, autocast and loss scaling, gradient checkpointing) belongs to the engine
(:mod:`medvl.train.engines`), which applies it the same way for every recipe.

Checkpoints are reported at each validation through ``ray.train.report``; Ray persists them to
``RunConfig(storage_path=…)`` and registers one only after it is fully uploaded, so a crash mid-save leaves
the previous checkpoint as the latest. Each checkpoint is an HF folder (``from_pretrained`` loads it) plus
``training_state.pt`` (optimizer, scheduler, counters, RNG, and the rows already trained in the current epoch)
for resuming. A restarted worker group (``FailureConfig(max_failures=…)``) resumes mid-epoch: the data
pipeline skips the rows the checkpoint says were trained (:mod:`medvl.data.position`), so every sample of an
epoch is trained exactly once and the run ends on the same optimizer step as an uninterrupted one.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from medvl.data.position import ROW_KEY, write_position
from medvl.models.base import Recipe, describe_parameters, parameter_report
from medvl.models.cache import local_model
from medvl.models.registry import build_recipe
from medvl.spec import JobSpec
from medvl.train.engines import DdpEngine, ZeroEngine, build_engine
from medvl.train.reporting import StartupClock, StepMeter
from medvl.train.session import TrainWorkerSession, TrialSession

TRAINING_STATE = "training_state.pt"


@dataclass
class WorkerRun:
    """What validation and checkpointing need from the loop, kept together."""

    spec: JobSpec
    recipe: Recipe
    engine: DdpEngine | ZeroEngine
    device: torch.device
    val_shard: Any
    meter: StepMeter
    session: TrainWorkerSession | TrialSession
    position_file: tuple[Any, str] | None = None  # (pyarrow filesystem, path) read by the train pipeline's actors
    epoch_trained: list[int] = field(default_factory=list)  # row keys trained this epoch, as of the checkpoint
    consumed: list[int] = field(default_factory=list)  # row keys this worker trained since then


@dataclass
class TrainState:
    epoch: int = 0
    step: int = 0  # optimizer steps taken
    best_val_loss: float = math.inf
    validations_without_improvement: int = 0
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)  # every validation (Ray's result keeps only kept checkpoints')
    epochs: list[dict] = field(default_factory=list)  # per finished epoch: samples trained, distinct samples
    resumed_at_steps: list[int] = field(default_factory=list)  # where a restarted worker group picked up


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """``TorchTrainer``'s entry point."""
    run_loop(config, TrainWorkerSession())


def run_loop(config: dict[str, Any], session: TrainWorkerSession | TrialSession) -> None:
    """Train ``config["spec"]`` to its end (epochs, ``total_steps``, early stopping), reporting each validation
    with a checkpoint to ``session``; resumes from the session's checkpoint when there is one."""
    spec: JobSpec = config["spec"]
    startup = StartupClock(config.get("startup_stamps"))
    if session.startup_mark:
        startup.mark(session.startup_mark)
    recipe = build_recipe(spec)
    settings = spec.train
    rank = session.world_rank
    torch.manual_seed(settings.seed + rank)
    if config.get("torch_threads"):
        torch.set_num_threads(config["torch_threads"])

    total_steps = config["total_steps"]
    # A model on object storage is loaded from this node's cached copy (fetched once per node).
    source = local_model(config["model_source"], spec.data.endpoint_url, config.get("model_filesystem"))
    engine = build_engine(spec, recipe, source, total_steps, config.get("deepspeed_file"), session.prepare_model)
    model = engine.model
    state, epoch_trained = TrainState(), []
    device = session.device
    startup.mark("model")
    parameters = parameter_report(engine.unwrapped)
    meter = StepMeter(config.get("progress_board"), spec.tracking.log_every_steps, rank, device, parameters, startup)
    if meter.board is not None:  # a Tune trial has none: its summary records the counts, not a line per trial
        meter.note(describe_parameters(parameters))

    checkpoint = session.checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state, epoch_trained = _load_training_state(Path(folder), engine)
        state.resumed_at_steps.append(state.step)
        meter.note(f"resumed from checkpoint at epoch {state.epoch + 1}, step {state.step} "
                   f"({len(epoch_trained)} samples of the epoch already trained)")

    train_shard = session.dataset("train")
    run = WorkerRun(spec, recipe, engine, device, session.dataset("val"), meter, session,
                    config.get("position_file"), epoch_trained)

    while state.epoch < settings.epochs and not state.stopped_early and state.step < total_steps:
        model.train()
        _publish_position(run)
        running = []
        batches = train_shard.iter_torch_batches(
            batch_size=settings.batch_size,
            local_shuffle_buffer_size=spec.data.shuffle_buffer or None,
            local_shuffle_seed=settings.seed + state.epoch if spec.data.shuffle_buffer else None,
            device=device,
        )
        for micro_step, batch in enumerate(batches):
            if startup.mark("data"):
                meter.resume()  # training time starts with the first batch; start-up is reported apart
            keys = batch.pop(ROW_KEY, None)
            if keys is not None:
                run.consumed.extend(keys.tolist())
            meter.count(batch)
            with engine.autocast():
                loss, _ = recipe.loss(model, engine.prepare_batch(batch))
            running.append(loss.item())
            if not engine.backward_and_step(loss, boundary=(micro_step + 1) % settings.grad_accum == 0):
                continue
            state.step += 1
            startup.mark("first_step")
            recipe.after_optimizer_step(engine.unwrapped, state.step, total_steps)
            meter.after_step(state.step, state.epoch, running, engine)
            if settings.eval_every_steps and state.step % settings.eval_every_steps == 0:
                _validate_and_report(run, state, running)
                model.train()
                if state.stopped_early:
                    break
            if state.step >= total_steps:
                break
        _finish_epoch(run, state)
        _validate_and_report(run, state, running)  # also when the epoch ended on a validation: new resume point


def _publish_position(run: WorkerRun) -> None:
    """Tell this epoch's data pipeline which rows were trained already (none, unless resuming mid-epoch)."""
    if run.position_file is None:
        return
    if run.session.world_rank == 0:
        write_position(*run.position_file, run.epoch_trained)
    _barrier()  # no worker may start the epoch's pipeline before the file is right


def _gather_trained(run: WorkerRun) -> list[int]:
    """Row keys trained this epoch by every worker: the checkpoint's plus what each trained since."""
    gathered = [run.consumed]
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, run.consumed)
    return run.epoch_trained + [key for keys in gathered for key in keys]


def _finish_epoch(run: WorkerRun, state: TrainState) -> None:
    trained = _gather_trained(run)
    state.epochs.append({"epoch": state.epoch, "samples": len(trained), "distinct_samples": len(set(trained))})
    run.epoch_trained, run.consumed = [], []
    state.epoch += 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _validate_and_report(run: WorkerRun, state: TrainState, running: list[float]) -> None:
    spec = run.spec
    run.meter.pause()  # validation and checkpointing are not training time
    run.epoch_trained, run.consumed = _gather_trained(run), []
    validated = bool(state.history) and state.history[-1]["step"] == state.step  # the epoch ended on a validation
    if validated:
        val_loss = state.history[-1]["val_loss"]
    else:
        val_loss = evaluate_loss(run.recipe, run.engine, run.val_shard, spec, run.device)
        _update_early_stopping(state, val_loss, spec.train.early_stopping_patience)
    metrics = {
        "epoch": state.epoch,
        "step": state.step,
        "train_loss": sum(running[-50:]) / max(1, len(running[-50:])),
        "val_loss": val_loss,
        "lr": run.engine.lr(),
        "stopped_early": state.stopped_early,
        **run.meter.report_metrics(),  # costs, and the trainable / total parameters
    }
    if not validated:
        state.history.append({k: metrics[k] for k in ("epoch", "step", "train_loss", "val_loss")})
    metrics["history"] = list(state.history)
    metrics["epochs"] = list(state.epochs)
    metrics["resumed_at_steps"] = list(state.resumed_at_steps)
    if not validated:
        run.meter.validation(state.step, {k: metrics[k] for k in ("val_loss", "stopped_early")})
    with tempfile.TemporaryDirectory() as folder:
        writes = _save_checkpoint(Path(folder), run, state, run.session.world_rank)
        run.session.report(metrics, Path(folder) if writes else None)
    run.meter.resume()


def _update_early_stopping(state: TrainState, val_loss: float, patience: int) -> None:
    if val_loss < state.best_val_loss - 1e-4:
        state.best_val_loss, state.validations_without_improvement = val_loss, 0
    else:
        state.validations_without_improvement += 1
    state.stopped_early = bool(patience) and state.validations_without_improvement >= patience


@torch.no_grad()
def evaluate_loss(recipe: Recipe, engine, shard, spec: JobSpec, device) -> float:
    """Mean validation loss over this worker's shard, averaged over all workers (so all agree on stopping)."""
    engine.model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    batch_size = spec.train.val_batch_size or spec.train.batch_size
    for i, batch in enumerate(shard.iter_torch_batches(batch_size=batch_size, device=device)):
        if spec.train.max_val_batches and i >= spec.train.max_val_batches:
            break
        with engine.autocast():  # the forward of training: frozen low-precision weights beside fp32 trainable ones
            loss, _ = recipe.loss(engine.model, engine.prepare_batch(batch))
        n = next(iter(batch.values())).shape[0]
        total += torch.tensor([loss.item() * n, n], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    return float(total[0] / total[1]) if total[1] else math.nan


def _save_checkpoint(folder: Path, run: WorkerRun, state: TrainState, rank: int) -> bool:
    """Write this rank's part of a checkpoint into ``folder``; False if this rank has nothing to write."""
    engine_state = run.engine.save(folder, rank)
    if rank == 0:
        torch.save(
            {
                "state": asdict(state),
                "rng": torch.get_rng_state(),
                "epoch_trained": run.epoch_trained,
                **engine_state,
            },
            folder / TRAINING_STATE,
        )
    return any(folder.iterdir())


def _load_training_state(folder: Path, engine) -> tuple[TrainState, list[int]]:
    saved = torch.load(folder / TRAINING_STATE, weights_only=True)  # a pickle could run code on every worker
    engine.load(folder, saved)
    torch.set_rng_state(saved["rng"])
    return TrainState(**saved["state"]), saved.get("epoch_trained", [])

