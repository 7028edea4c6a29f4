"""BLIP image captioning (``BlipForConditionalGeneration``): the ROCO recipe and the quickstart model.

Fine-tuning policies (``train.finetune``):

* ``full`` — everything trains. Best captions, most memory.
* ``decoder`` — the vision encoder is frozen and only the text decoder learns: the usual choice when the
  pretrained ViT already sees radiographs well enough, and ~2× cheaper per step.
* ``encoder`` — only the vision encoder learns (the decoder keeps its language): useful to adapt the image
  features to a new modality while keeping the pretrained captioning head.

Text layout, preprocessing and the tiny preset are shared with the other BLIP recipes
(:mod:`medvl.models.blip_common`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from transformers import AutoTokenizer, BlipForConditionalGeneration

from medvl.models.base import Batch, GenerationSettings, LoadedModel, Recipe, TensorBatch, shifted_targets
from medvl.models.blip_common import (
    BlipPreprocessor,
    blip_attention_maps,
    lm_labels,
    save_blip_folder,
    save_random_blip,
    save_tiny_blip,
    torch_free_factory,
)
from medvl.models.precision import weight_dtype
from medvl.models.scored_generation import Generated, generate_scored


class BlipCaptionRecipe(Recipe):
    def initial_model(self, work_dir: Path, train_texts: Callable[[], Iterable[str]]) -> str:
        if self.spec.model.preset == "tiny":
            return save_tiny_blip(BlipForConditionalGeneration, work_dir, train_texts(), self.spec.data.image_size)
        if self.spec.model.preset == "random":
            return save_random_blip(BlipForConditionalGeneration, self.spec, work_dir, train_texts())
        return self.spec.model.name_or_path

    def preprocessor(self, model_source: str) -> Callable[[Batch], Batch]:
        data = self.spec.data
        return BlipPreprocessor(model_source, data.image_size, data.max_text_length, data.max_question_length)

    def preprocessor_factory(self, model_source: str, filesystem=None) -> Callable[[], Callable[[Batch], Batch]]:
        """The torch-free form of :meth:`preprocessor` where the folder allows it: Ray Data's actors start faster."""
        return (torch_free_factory(self.spec, model_source, filesystem)
                or super().preprocessor_factory(model_source, filesystem))

    def load_for_training(self, model_source: str) -> torch.nn.Module:
        model = BlipForConditionalGeneration.from_pretrained(model_source, dtype=weight_dtype(self.spec))
        apply_blip_finetune_policy(model, self.spec.train.finetune)
        return model

    def load_for_inference(self, model_dir: str) -> LoadedModel:
        return LoadedModel(BlipForConditionalGeneration.from_pretrained(model_dir, dtype=weight_dtype(self.spec)).eval(),
                           AutoTokenizer.from_pretrained(model_dir))

    def loss(self, model: torch.nn.Module, batch: TensorBatch) -> tuple[torch.Tensor, dict[str, float]]:
        output = model(
            pixel_values=batch["pixel_values"],
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=lm_labels(batch["input_ids"], batch["attention_mask"]),
        )
        return output.loss, {}

    def generate_scored(self, loaded: LoadedModel, batch: TensorBatch, settings: GenerationSettings) -> Generated:
        model = loaded.module
        return generate_scored(
            model.generate, model.text_decoder, loaded.tokenizer, model.config.text_config.sep_token_id,
            pixel_values=batch["pixel_values"], num_beams=settings.num_beams, max_new_tokens=settings.max_new_tokens,
            confidence_temperature=settings.confidence_temperature,
        )

    def target_logits(self, model: torch.nn.Module, batch: TensorBatch) -> tuple[torch.Tensor, torch.Tensor]:
        labels = lm_labels(batch["input_ids"], batch["attention_mask"])
        output = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"])
        return shifted_targets(output.logits, labels)

    def attention_maps(self, loaded: LoadedModel, batch: TensorBatch, texts: list[str]) -> np.ndarray:
        return blip_attention_maps(loaded.module, loaded.tokenizer, batch["pixel_values"], texts,
                                   self.spec.data.max_text_length)

    def save(self, model: torch.nn.Module, model_source: str, out_dir: Path) -> None:
        save_blip_folder(model, model_source, out_dir)


def apply_blip_finetune_policy(model: torch.nn.Module, policy: str) -> None:
    """Freeze exactly the part the policy does not train (see the module docstring)."""
    trainable_prefix = {"full": "", "decoder": "text_decoder.", "encoder": "vision_model."}
    if policy not in trainable_prefix:
        raise ValueError(f"train.finetune: expected one of full, decoder, encoder for BLIP, got {policy!r}")
    prefix = trainable_prefix[policy]
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith(prefix)
