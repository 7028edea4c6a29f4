"""How a worker's model is wrapped, stepped and checkpointed: plain DDP or DeepSpeed ZeRO (``train.strategy``).

The loop in :mod:`medvl.train.loop` is the same for both; an engine owns the optimizer, the scheduler and
the on-disk form of a checkpoint:

* :class:`DdpEngine`: ``ray.train.torch.prepare_model`` (DDP across workers), torch AdamW, accumulation and
  clipping done here, autocast to the training precision and, for fp16, a ``GradScaler`` (fp16 gradients
  underflow without loss scaling); trainable weights loaded in a low precision are cast back to fp32 first, so
  the optimizer state is fp32 while frozen weights stay small. Rank 0 writes the model with ``recipe.save`` (an
  HF folder) plus optimizer, scheduler and scaler.
* :class:`ZeroEngine`: ``deepspeed.initialize`` with the config of :mod:`medvl.train.deepspeed_config`;
  DeepSpeed accumulates, clips and scales fp16 losses; every rank writes its ZeRO shards with
  ``save_checkpoint`` into its own folder and Ray merges the folders into one checkpoint. Export consolidates
  the shards into an HF folder (:func:`consolidate`). With ZeRO-3 the model is loaded partitioned
  (``HfDeepSpeedConfig`` before ``from_pretrained``), so a 7B model is never whole on one rank. bf16/fp16
  weights with an fp32 master copy in the optimizer are DeepSpeed's own; no autocast.

Both engines switch on ``train.gradient_checkpointing`` (:mod:`medvl.models.checkpointing`) before wrapping.

DeepSpeed runs on CPU too (its CPU accelerator over Ray's gloo process group), which is how CI tests it.
"""
from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch

from medvl.models.base import Recipe
from medvl.models.cache import local_model, remote_name
from medvl.models.checkpointing import enable_gradient_checkpointing
from medvl.models.precision import PRECISION_DTYPES, autocast, keep_trainable_in_fp32, training_precision
from medvl.spec import JobSpec
from medvl.train.schedule import warmup_cosine

DEEPSPEED_TAG = "zero"  # DeepSpeed's sub-folder inside a checkpoint
DEEPSPEED_MARKER = "medvl_deepspeed.json"  # says "consolidate me" to the export


def build_engine(spec: JobSpec, recipe: Recipe, model_source: str, total_steps: int,
                 deepspeed_file: dict[str, Any] | None = None,
                 prepare_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None):
    """``deepspeed_file``: the contents of ``train.deepspeed.config_file`` as the driver read it;
    ``prepare_model``: how the DDP engine wraps the model (default ``ray.train.torch.prepare_model``)."""
    if spec.train.strategy == "deepspeed":
        return ZeroEngine(spec, recipe, model_source, total_steps, deepspeed_file)
    return DdpEngine(spec, recipe, model_source, total_steps, prepare_model)


def _optimizer_and_scheduler(spec: JobSpec, parameters: list[torch.nn.Parameter], total_steps: int):
    settings = spec.train
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = warmup_cosine(optimizer, settings.lr, int(settings.warmup_ratio * total_steps), total_steps,
                              start_lr=settings.warmup_start_lr, min_lr=settings.min_lr)
    return optimizer, scheduler


class DdpEngine:
    def __init__(self, spec: JobSpec, recipe: Recipe, model_source: str, total_steps: int,
                 prepare_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None):
        self.spec, self.recipe, self.model_source = spec, recipe, model_source
        model = recipe.load_for_training(model_source)
        if spec.train.checkpoints_activations:
            enable_gradient_checkpointing(model)
        keep_trainable_in_fp32(model)
        if prepare_model is None:
            import ray.train.torch

            prepare_model = ray.train.torch.prepare_model
        self.model = prepare_model(model)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = _optimizer_and_scheduler(spec, self.trainable, total_steps)
        self.precision = training_precision(spec)
        self.device_type = next(self.model.parameters()).device.type
        self.scaler = torch.amp.GradScaler(self.device_type) if self.precision == "fp16" else None

    @property
    def unwrapped(self) -> torch.nn.Module:
        return getattr(self.model, "module", self.model)

    def autocast(self):
        return autocast(self.precision, self.device_type)

    def prepare_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return batch

    def backward_and_step(self, loss: torch.Tensor, boundary: bool) -> bool:
        """Accumulate ``loss``'s gradients; at an accumulation boundary clip and step. True if a step happened
        (with fp16, the scaler may skip the optimizer step on overflow; the schedule still advances)."""
        loss = loss / self.spec.train.grad_accum
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if not boundary:
            return False
        if self.scaler:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        self.last_grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.spec.train.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, folder: Path, rank: int) -> dict[str, Any]:
        """Write the model (rank 0); return the optimizer state for the loop's training-state file."""
        if rank != 0:
            return {}
        self.recipe.save(self.unwrapped, self.model_source, folder)
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load(self, folder: Path, saved: dict[str, Any]) -> None:
        self.recipe.restore(self.unwrapped, folder)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.scaler and "scaler" in saved:
            self.scaler.load_state_dict(saved["scaler"])


class ZeroEngine:
    def __init__(self, spec: JobSpec, recipe: Recipe, model_source: str, total_steps: int,
                 deepspeed_file: dict[str, Any] | None = None):
        import ray.train

        deepspeed = import_deepspeed()
        from transformers.integrations import HfDeepSpeedConfig

        from medvl.train.deepspeed_config import deepspeed_config

        self.spec, self.recipe, self.model_source = spec, recipe, model_source
        # Adopt the process group Ray Train set up (gloo on CPU, NCCL on GPUs) before anything asks its size.
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        world_size = ray.train.get_context().get_world_size()
        self.config = deepspeed_config(spec, world_size, deepspeed_file)
        precision = training_precision(spec)
        self.dtype = PRECISION_DTYPES[precision] if precision != "fp32" else None
        # Alive while from_pretrained runs: with ZeRO-3 it makes transformers load the weights partitioned.
        self._hf_deepspeed_config = HfDeepSpeedConfig(self.config)
        model = recipe.load_for_training(model_source)
        if spec.train.checkpoints_activations:
            enable_gradient_checkpointing(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer, scheduler = _optimizer_and_scheduler(spec, trainable, total_steps)
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=trainable, optimizer=optimizer, lr_scheduler=scheduler, config=self.config
        )

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.model.module

    def autocast(self):
        return nullcontext()  # DeepSpeed holds the weights in the training precision itself

    def prepare_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """DeepSpeed runs bf16/fp16 weights without autocast: floating inputs must match them."""
        if self.dtype is None:
            return batch
        return {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in batch.items()}

    def backward_and_step(self, loss: torch.Tensor, boundary: bool) -> bool:
        """DeepSpeed counts micro-batches itself; it steps (clip, optimizer, scheduler) at its own boundary."""
        stepped = self.model.is_gradient_accumulation_boundary()
        self.model.backward(loss)
        self.model.step()
        return stepped

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, folder: Path, rank: int) -> dict[str, Any]:
        """Every rank writes its shards (Ray merges the ranks' folders); rank 0 adds what export needs."""
        self.model.save_checkpoint(str(folder), tag=DEEPSPEED_TAG)
        if rank == 0:
            (folder / DEEPSPEED_MARKER).write_text(json.dumps({"model_source": self.model_source,
                                                              "tag": DEEPSPEED_TAG}))
        return {}

    def load(self, folder: Path, saved: dict[str, Any]) -> None:
        path, _ = self.model.load_checkpoint(str(folder), tag=DEEPSPEED_TAG)
        if path is None:
            raise FileNotFoundError(f"{folder}: no DeepSpeed checkpoint {DEEPSPEED_TAG!r} to resume from")


def import_deepspeed():
    """DeepSpeed, set up for this machine: its CPU accelerator where there is no CUDA, no C++ builds at init."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as exc:
        raise ImportError("train.strategy: deepspeed needs the deepspeed package "
                          "(pip install --no-build-isolation deepspeed, after torch)") from exc
    # Its shared-memory allreduce compiles a C++ extension (~1 min) on CPU; gloo does the job here.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def is_deepspeed_checkpoint(folder: Path) -> bool:
    return (folder / DEEPSPEED_MARKER).is_file()


def consolidate(folder: Path, recipe: Recipe, out_dir: Path) -> None:
    """Merge a checkpoint's ZeRO shards into full fp32 weights and save them as ``recipe.save`` would."""
    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    marker = json.loads((folder / DEEPSPEED_MARKER).read_text())
    state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=marker["tag"])
    # The workers loaded their start from a cached copy, maybe on another node: fetch its URL's copy here.
    source = local_model(remote_name(marker["model_source"]) or marker["model_source"], recipe.spec.data.endpoint_url)
    model = recipe.load_for_training(source)
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"{folder}: ZeRO shards do not match the model: {result.unexpected_keys[:5]}")
    recipe.save(model, source, out_dir)
