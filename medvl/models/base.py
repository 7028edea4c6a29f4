"""The contract between a model family ("recipe") and medvl's generic prepare/train/eval/serve code.

The training loop, the evaluator and the server know nothing about BLIP or LoRA: they call a
:class:`Recipe`. A recipe answers five questions:

1. Where does the starting model come from? (:meth:`Recipe.initial_model`: a hub id / local folder, or a
   tiny random-init model it builds and saves so that every worker loads it the same way.)
2. How does a batch of shard rows become tensors? (:meth:`Recipe.preprocessor`, run inside Ray Data.)
3. What does a training step minimise? (:meth:`Recipe.loss`.)
4. How does it produce text, and how sure is it? (:meth:`Recipe.generate_scored`: texts and the mean
   probability of their tokens.)
5. How is it saved so that ``from_pretrained`` (or peft) loads it elsewhere? (:meth:`Recipe.save`.)

Freezing policies and adapters are applied in :meth:`Recipe.load_for_training`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from medvl.models.scored_generation import Generated
from medvl.spec import JobSpec

Batch = dict[str, np.ndarray]
TensorBatch = dict[str, torch.Tensor]


class Recipe(ABC):
    """One model family. Subclasses are registered in :mod:`medvl.models.registry`."""

    task: str = "caption"  # "caption" (image → text) or "vqa" (image + question → answer)
    #: What the served model is asked for: POST /v1/<endpoint> ("caption", "report" or "vqa").
    endpoint: str = "caption"
    #: Columns of the preprocessed batch that go to the model (others, such as ids, stay behind).
    tensor_columns: tuple[str, ...] = ("pixel_values", "input_ids", "attention_mask")

    def __init__(self, spec: JobSpec):
        self.spec = spec

    @abstractmethod
    def initial_model(self, work_dir: Path, train_texts: Callable[[], Iterable[str]]) -> str:
        """Return the hub id or folder the run starts from; tiny presets build and save one in ``work_dir``."""

    @abstractmethod
    def preprocessor(self, model_source: str) -> Callable[[Batch], Batch]:
        """A picklable callable for ``Dataset.map_batches``: shard rows → model inputs (numpy)."""

    @abstractmethod
    def load_for_training(self, model_source: str) -> torch.nn.Module:
        """The model with the spec's freezing policy / adapters applied."""

    @abstractmethod
    def load_for_inference(self, model_dir: str) -> torch.nn.Module:
        """A saved model (as written by :meth:`save`) ready for :meth:`generate`."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: TensorBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss and any extra scalars worth logging."""

    @abstractmethod
    def generate_scored(self, model: torch.nn.Module, batch: TensorBatch) -> Generated:
        """Decoded texts for a preprocessed batch, with the spec's eval settings (beams, length), and the mean
        probability of each text's generated tokens."""

    def generate(self, model: torch.nn.Module, batch: TensorBatch) -> list[str]:
        return self.generate_scored(model, batch).texts

    @abstractmethod
    def save(self, model: torch.nn.Module, model_source: str, out_dir: Path) -> None:
        """Write the model and its processor/tokenizer in HF layout."""

    # ---- optional hooks, with defaults that suit plain HF models

    def restore(self, model: torch.nn.Module, checkpoint_dir: Path) -> None:
        """Load the trainable weights of a checkpoint written by :meth:`save` into ``model`` (for resuming)."""
        from safetensors.torch import load_file

        result = model.load_state_dict(load_file(checkpoint_dir / "model.safetensors"), strict=False)
        if result.unexpected_keys:  # missing keys are tied weights, which HF saves once
            raise RuntimeError(f"checkpoint {checkpoint_dir} does not match the model: {result.unexpected_keys[:5]}")

    def after_optimizer_step(self, model: torch.nn.Module, step: int, total_steps: int) -> None:
        """Called after every optimizer step (e.g. to update an EMA teacher)."""

    def extra_eval_metrics(self, model: torch.nn.Module, batch: TensorBatch) -> dict[str, float]:
        """Scalars averaged over eval batches into metrics.json (e.g. attention share of a visual prefix)."""
        return {}

    def attention_maps(self, model: torch.nn.Module, batch: TensorBatch, texts: list[str]) -> np.ndarray | None:
        """Where the text looked: (B, rows, cols) attention of the decoder on the image patches while reading
        ``texts``, averaged over heads, layers and tokens, each map summing to 1. None if the recipe has none."""
        return None

    def target_text(self, row: dict[str, Any]) -> str:
        """The reference a generation is scored against."""
        return str(row["answer"] if self.task == "vqa" else row["text"])


def frozen_report(model: torch.nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total}
