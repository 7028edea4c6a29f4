"""The contract between a model family ("recipe") and medvl's generic prepare/train/eval/serve code.

The training loop, the evaluator and the server know nothing about BLIP or LoRA: they call a
:class:`Recipe`. A recipe answers five questions:

1. Where does the starting model come from? (:meth:`Recipe.initial_model`: a hub id / local folder, or a
   tiny random-init model it builds and saves so that every worker loads it the same way.)
2. How does a batch of shard rows become tensors? (:meth:`Recipe.preprocessor`, run inside Ray Data.)
3. What does a training step minimise? (:meth:`Recipe.loss`.)
4. How does it produce text, and how sure is it? (:meth:`Recipe.generate_scored`: texts and the mean
   probability of their tokens, for a :class:`LoadedModel` and explicit :class:`GenerationSettings`.)
5. How is it saved so that ``from_pretrained`` (or peft) loads it elsewhere? (:meth:`Recipe.save`.)

Freezing policies and adapters are applied in :meth:`Recipe.load_for_training`. What a recipe accepts (finetune
policies, options, task, endpoint) is its card in :mod:`medvl.models.registry`, checked before Ray starts.
A recipe object holds the spec and nothing else: a loaded model travels with its tokenizer as a
:class:`LoadedModel`, and whoever generates (eval, serve) says how (:class:`GenerationSettings`).
"""
from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from medvl.data.preprocessing import Batch
from medvl.models.registry import RecipeCard, card_for
from medvl.models.scored_generation import Generated
from medvl.spec import EvalSpec, JobSpec

TensorBatch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode: eval takes them from ``eval``, serve from ``serve`` (falling back to eval's). ``prompt``:
    text the model reads before generating (the zero_shot baseline; recipes whose card says ``prompted``)."""

    num_beams: int
    max_new_tokens: int
    prompt: str = ""
    # the model's fitted calibration temperature (medvl.eval.calibration): divides the scores of the chosen
    # tokens' probabilities, never what is chosen
    confidence_temperature: float = 1.0

    @classmethod
    def from_eval(cls, settings: EvalSpec) -> GenerationSettings:
        return cls(settings.num_beams, settings.max_new_tokens)


@dataclass
class LoadedModel:
    """A model ready to generate, with the tokenizer that decodes its output."""

    module: torch.nn.Module
    tokenizer: Any

    def to(self, device: torch.device | str) -> LoadedModel:
        self.module.to(device)
        return self


class Recipe(ABC):
    """One model family, registered with its card in :mod:`medvl.models.registry`."""

    #: Columns of the preprocessed batch that go to the model (others, such as ids, stay behind).
    tensor_columns: tuple[str, ...] = ("pixel_values", "input_ids", "attention_mask")

    def __init__(self, spec: JobSpec):
        self.spec = spec

    @property
    def card(self) -> RecipeCard:
        return card_for(self.spec.model.recipe)

    @property
    def task(self) -> str:
        """"caption" (image → text) or "vqa" (image + question → answer)."""
        return self.card.task

    @property
    def endpoint(self) -> str:
        """What the served model is asked for: POST /v1/<endpoint> ("caption", "report" or "vqa")."""
        return self.card.endpoint

    @abstractmethod
    def initial_model(self, work_dir: Path, train_texts: Callable[[], Iterable[str]]) -> str:
        """Return the hub id or folder the run starts from; tiny presets build and save one in ``work_dir``."""

    @abstractmethod
    def preprocessor(self, model_source: str) -> Callable[[Batch], Batch]:
        """A picklable callable for ``Dataset.map_batches``: shard rows → model inputs (numpy)."""

    def preprocessor_factory(self, model_source: str, filesystem=None) -> Callable[[], Callable[[Batch], Batch]]:
        """A picklable, argument-less callable that builds this recipe's preprocessor where it runs (a Ray Data
        actor, maybe on another node: a model on object storage is fetched there; ``filesystem`` as in
        :func:`medvl.models.cache.local_model`). By default it unpickles this recipe (importing its model code)
        and calls :meth:`preprocessor`; a recipe whose preprocessing has a torch-free form returns one that
        builds that instead (see :class:`medvl.data.preprocessing.FolderPreprocessor`)."""
        from medvl.models.cache import preprocessor_for

        return functools.partial(preprocessor_for, self, model_source, filesystem)

    @abstractmethod
    def load_for_training(self, model_source: str) -> torch.nn.Module:
        """The model with the spec's freezing policy / adapters applied."""

    @abstractmethod
    def load_for_inference(self, model_dir: str) -> LoadedModel:
        """A saved model (as written by :meth:`save`), in eval mode, with its tokenizer."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: TensorBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss and any extra scalars worth logging."""

    @abstractmethod
    def generate_scored(self, loaded: LoadedModel, batch: TensorBatch, settings: GenerationSettings) -> Generated:
        """Decoded texts for a preprocessed batch and the mean probability of each text's generated tokens."""

    def generate(self, loaded: LoadedModel, batch: TensorBatch, settings: GenerationSettings) -> list[str]:
        return self.generate_scored(loaded, batch, settings).texts

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

    def attention_maps(self, loaded: LoadedModel, batch: TensorBatch, texts: list[str]) -> np.ndarray | None:
        """Where the text looked: (B, rows, cols) attention of the decoder on the image patches while reading
        ``texts``, averaged over heads, layers and tokens, each map summing to 1. None if the recipe has none."""
        return None

    def target_logits(self, model: torch.nn.Module, batch: TensorBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Teacher forcing: (logits [tokens, vocabulary], reference tokens [tokens]) at every position the loss
        scores, for temperature scaling (:mod:`medvl.eval.calibration`). None: the recipe has no such view."""
        return None

    def target_text(self, row: dict[str, Any]) -> str:
        """The reference a generation is scored against."""
        return str(row["answer"] if self.task == "vqa" else row["text"])


def shifted_targets(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal LM's (logits, targets) where ``labels`` (-100 = not scored) are read one position ahead, as the
    HF loss reads them."""
    logits, labels = logits[:, :-1], labels[:, 1:].to(logits.device)
    scored = labels != -100
    return logits[scored], labels[scored]


def parameter_report(model: torch.nn.Module) -> dict[str, int | float]:
    """Trainable and total parameters, and the trainable share in percent (a ZeRO-3 partitioned parameter counts
    with its full size; a parameter shared by two modules, such as tied embeddings, once)."""
    trainable = total = 0
    for parameter in model.parameters():  # unique parameters
        size = getattr(parameter, "ds_numel", parameter.numel())
        total += size
        trainable += size if parameter.requires_grad else 0
    return {"trainable_params": trainable, "total_params": total,
            "trainable_percent": 100.0 * trainable / total if total else 0.0}


def describe_parameters(report: dict[str, int | float]) -> str:
    """``trainable parameters: 5,242,880 of 3,749,922,816 (0.140 %)``."""
    return (f"trainable parameters: {report['trainable_params']:,} of {report['total_params']:,} "
            f"({report['trainable_percent']:.3f} %)")
