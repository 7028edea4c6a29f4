"""The per-worker training loop run by Ray Train's ``TorchTrainer`` (Train V2 APIs).

One loop serves every recipe: the recipe supplies the loss; this file owns optimisation (AdamW, linear
warm-up + cosine decay, gradient accumulation and clipping, autocast where the device supports it),
validation, early stopping and checkpoints.

Checkpoints are reported at each validation through ``ray.train.report``; Ray persists them to
``RunConfig(storage_path=…)`` and registers one only after it is fully uploaded, so a crash mid-save leaves
the previous checkpoint as the latest. Each checkpoint is an HF folder (``from_pretrained`` loads it) plus
``training_state.pt`` (optimizer, scheduler, counters) for resuming.
"""
from __future__ import annotations

import math
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from transformers import get_cosine_schedule_with_warmup

from medvl.models.base import Recipe
from medvl.models.registry import build_recipe
from medvl.spec import JobSpec

TRAINING_STATE = "training_state.pt"
LOG_EVERY_STEPS = 50


@dataclass
class WorkerRun:
    """What validation and checkpointing need from the loop, kept together."""

    spec: JobSpec
    recipe: Recipe
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    model_source: str
    device: torch.device
    val_shard: Any


@dataclass
class TrainState:
    epoch: int = 0
    step: int = 0  # optimizer steps taken
    best_val_loss: float = math.inf
    validations_without_improvement: int = 0
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)  # every validation (Ray's result keeps only kept checkpoints')


def train_loop_per_worker(config: dict[str, Any]) -> None:
    spec: JobSpec = config["spec"]
    recipe = build_recipe(spec)
    settings = spec.train
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(settings.seed + rank)
    if config.get("torch_threads"):
        torch.set_num_threads(config["torch_threads"])

    model = recipe.load_for_training(config["model_source"])
    model = ray.train.torch.prepare_model(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    total_steps = config["total_steps"]
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(settings.warmup_ratio * total_steps), total_steps)
    state = TrainState()

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            recipe.restore(_unwrap(model), Path(folder))
            state = _load_training_state(Path(folder), optimizer, scheduler)
        _log(rank, f"resumed from checkpoint at epoch {state.epoch}, step {state.step}")

    autocast = _autocast_context(settings.precision)
    train_shard = ray.train.get_dataset_shard("train")
    device = ray.train.torch.get_device()
    run = WorkerRun(spec, recipe, model, optimizer, scheduler, config["model_source"], device,
                    ray.train.get_dataset_shard("val"))

    while state.epoch < settings.epochs and not state.stopped_early and state.step < total_steps:
        model.train()
        started, steps_at_start, running = time.perf_counter(), state.step, []
        batches = train_shard.iter_torch_batches(
            batch_size=settings.batch_size,
            local_shuffle_buffer_size=spec.data.shuffle_buffer or None,
            local_shuffle_seed=settings.seed + state.epoch if spec.data.shuffle_buffer else None,
            device=device,
        )
        for micro_step, batch in enumerate(batches):
            with autocast:
                loss, _ = recipe.loss(model, batch)
            (loss / settings.grad_accum).backward()
            running.append(loss.item())
            if (micro_step + 1) % settings.grad_accum:
                continue
            torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            recipe.after_optimizer_step(_unwrap(model), state.step, total_steps)
            if state.step % LOG_EVERY_STEPS == 0:
                rate = (state.step - steps_at_start) / (time.perf_counter() - started)
                _log(rank, f"epoch {state.epoch + 1} step {state.step}/{total_steps} "
                           f"loss {sum(running[-20:]) / len(running[-20:]):.3f} ({rate:.1f} steps/s)")
            if settings.eval_every_steps and state.step % settings.eval_every_steps == 0:
                _validate_and_report(run, state, running)
                model.train()
                if state.stopped_early:
                    break
            if state.step >= total_steps:
                break
        state.epoch += 1
        if not settings.eval_every_steps or state.step % settings.eval_every_steps:
            _validate_and_report(run, state, running)


def _validate_and_report(run: WorkerRun, state: TrainState, running: list[float]) -> None:
    spec = run.spec
    val_loss = evaluate_loss(run.recipe, run.model, run.val_shard, spec, run.device)
    improved = val_loss < state.best_val_loss - 1e-4
    if improved:
        state.best_val_loss, state.validations_without_improvement = val_loss, 0
    else:
        state.validations_without_improvement += 1
    patience = spec.train.early_stopping_patience
    state.stopped_early = bool(patience) and state.validations_without_improvement >= patience
    metrics = {
        "epoch": state.epoch,
        "step": state.step,
        "train_loss": sum(running[-50:]) / max(1, len(running[-50:])),
        "val_loss": val_loss,
        "lr": run.scheduler.get_last_lr()[0],
        "stopped_early": state.stopped_early,
    }
    state.history.append({k: metrics[k] for k in ("epoch", "step", "train_loss", "val_loss")})
    metrics["history"] = list(state.history)
    rank = ray.train.get_context().get_world_rank()
    _log(rank, f"validation at step {state.step}: val_loss {val_loss:.4f}" + (" (stopping early)" if state.stopped_early else ""))
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            _save_checkpoint(Path(folder), run, state)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


@torch.no_grad()
def evaluate_loss(recipe: Recipe, model, shard, spec: JobSpec, device) -> float:
    """Mean validation loss over this worker's shard, averaged over all workers (so all agree on stopping)."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for i, batch in enumerate(shard.iter_torch_batches(batch_size=spec.train.batch_size, device=device)):
        if spec.train.max_val_batches and i >= spec.train.max_val_batches:
            break
        loss, _ = recipe.loss(model, batch)
        n = next(iter(batch.values())).shape[0]
        total += torch.tensor([loss.item() * n, n], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    return float(total[0] / total[1]) if total[1] else math.nan


def _autocast_context(precision: str):
    if precision == "fp32":
        return nullcontext()
    if torch.cuda.is_available():
        if precision in ("auto", "bf16") and torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16)
        if precision == "fp16":
            return torch.autocast("cuda", dtype=torch.float16)
        return nullcontext()
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()  # "auto" on CPU: fp32 (CPU autocast is slower than fp32 on most x86 cores)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _save_checkpoint(folder: Path, run: WorkerRun, state: TrainState) -> None:
    run.recipe.save(_unwrap(run.model), run.model_source, folder)
    torch.save(
        {
            "state": asdict(state),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
        },
        folder / TRAINING_STATE,
    )


def _load_training_state(folder: Path, optimizer, scheduler) -> TrainState:
    saved = torch.load(folder / TRAINING_STATE, weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])
    return TrainState(**saved["state"])


def _log(rank: int, message: str) -> None:
    if rank == 0:
        print(f"[medvl train] {message}", flush=True)
