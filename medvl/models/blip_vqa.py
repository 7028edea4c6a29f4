"""BLIP visual question answering (``BlipForQuestionAnswering``): question + image in, free-text answer out.

The question runs through the text encoder, whose cross-attention reads the image patches; the answer decoder
cross-attends to the fused question states. Answers are generated, not classified, so open questions with
answers never seen in training can still be scored (by exact match and edit similarity, see
:mod:`medvl.eval.vqa_metrics`).

Fine-tuning policies (``train.finetune``): ``frozen_vision`` (the usual choice after domain-adaptive
pretraining: the ViT already sees radiographs and VQA-RAD is too small to move it without overfitting; the
text encoder and decoder train) or ``full``.

Text layout, matching ``BlipProcessor`` for the hub checkpoints: the question is ``[cls] tokens [sep]`` (BERT's
``[CLS]``; the tiny tokenizer's ``[BOS]``), the answer is ``[bos] tokens [sep]`` with the decoder's
``bos_token_id``. Training passes the answer as ``decoder_input_ids`` and again, padding masked to -100, as
``labels`` (the decoder shifts them itself): passing only ``labels`` would feed the -100s to the embedding.

Decoding calls the encoder and ``text_decoder.generate`` directly instead of ``BlipForQuestionAnswering.generate``
so that the decoder gets the question mask training gave it (the latter passes an all-ones mask). In
transformers 5.23 this changes nothing yet: ``BlipTextAttention`` drops the cross-attention mask, so the decoder
attends to the question's padding positions in training and decoding alike. Questions are therefore always
padded to ``data.max_question_length``, which keeps the two consistent.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from transformers import AutoTokenizer, BlipForQuestionAnswering

from medvl.models.base import Batch, GenerationSettings, LoadedModel, Recipe, TensorBatch, shifted_targets
from medvl.models.blip_common import (
    BlipPreprocessor,
    apply_frozen_vision_policy,
    encode_texts,
    lm_labels,
    save_blip_folder,
    save_random_blip,
    save_tiny_blip,
)
from medvl.models.precision import weight_dtype
from medvl.models.scored_generation import Generated, generate_scored

VQA_COLUMNS = ("pixel_values", "question_input_ids", "question_attention_mask",
               "answer_input_ids", "answer_attention_mask")


class VqaPreprocessor(BlipPreprocessor):
    """Adds ``question_*`` (encoder input) and ``answer_*`` (decoder input and target) to the image batch."""

    def __call__(self, batch: Batch) -> Batch:
        out = super().__call__(batch)
        out["question_input_ids"], out["question_attention_mask"] = encode_texts(
            self.tokenizer, [str(q) for q in out["question"]], self.max_question_length, self.cls, self.sep, self.pad
        )
        out["answer_input_ids"], out["answer_attention_mask"] = encode_texts(
            self.tokenizer, [str(a) for a in out["answer"]], self.max_text_length, self.bos, self.sep, self.pad
        )
        return out


def vqa_loss(model: torch.nn.Module, batch: TensorBatch) -> torch.Tensor:
    """Answer cross-entropy through ``model.forward`` (so DDP's gradient hooks see the call)."""
    return model(
        input_ids=batch["question_input_ids"],
        attention_mask=batch["question_attention_mask"],
        pixel_values=batch["pixel_values"],
        decoder_input_ids=batch["answer_input_ids"],
        decoder_attention_mask=batch["answer_attention_mask"],
        labels=lm_labels(batch["answer_input_ids"], batch["answer_attention_mask"]),
    ).loss


def encode_question(model: BlipForQuestionAnswering, batch: TensorBatch) -> torch.Tensor:
    """The question's text-encoder states, cross-attending to the image (what the answer decoder reads)."""
    image_embeds = model.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    return model.text_encoder(
        input_ids=batch["question_input_ids"],
        attention_mask=batch["question_attention_mask"],
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_mask,
    ).last_hidden_state


@torch.no_grad()
def generate_answers(model: BlipForQuestionAnswering, batch: TensorBatch, **generate_kwargs) -> torch.Tensor:
    """Answer token ids, the decoder attending only to real question tokens (as in training)."""
    question = encode_question(model, batch)
    text = model.config.text_config
    bos = torch.full((question.shape[0], 1), text.bos_token_id, dtype=torch.long, device=question.device)
    return model.text_decoder.generate(
        input_ids=bos,
        eos_token_id=text.sep_token_id,
        pad_token_id=text.pad_token_id,
        encoder_hidden_states=question,
        encoder_attention_mask=batch["question_attention_mask"],
        **generate_kwargs,
    )


def answer_target_logits(model: BlipForQuestionAnswering, batch: TensorBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher forcing on the answer: (logits, tokens) at every answer position the VQA loss scores."""
    answer_ids, answer_mask = batch["answer_input_ids"], batch["answer_attention_mask"]
    logits = model.text_decoder(
        input_ids=answer_ids,
        attention_mask=answer_mask,
        encoder_hidden_states=encode_question(model, batch),
        encoder_attention_mask=batch["question_attention_mask"],
    ).logits
    return shifted_targets(logits, lm_labels(answer_ids, answer_mask))


class BlipVqaRecipe(Recipe):
    tensor_columns = VQA_COLUMNS

    def initial_model(self, work_dir: Path, train_texts: Callable[[], Iterable[str]]) -> str:
        if self.spec.model.preset == "tiny":
            return save_tiny_blip(BlipForQuestionAnswering, work_dir, train_texts(), self.spec.data.image_size)
        if self.spec.model.preset == "random":
            return save_random_blip(BlipForQuestionAnswering, self.spec, work_dir, train_texts())
        return self.spec.model.name_or_path

    def preprocessor(self, model_source: str) -> Callable[[Batch], Batch]:
        data = self.spec.data
        return VqaPreprocessor(model_source, data.image_size, data.max_text_length, data.max_question_length)

    def load_for_training(self, model_source: str) -> torch.nn.Module:
        """From a hub id, a tiny-init folder, a saved VQA model or a DAPT stage's export (same layout)."""
        model = BlipForQuestionAnswering.from_pretrained(model_source, dtype=weight_dtype(self.spec))
        apply_frozen_vision_policy(model, self.spec.train.finetune)
        return model

    def load_for_inference(self, model_dir: str) -> LoadedModel:
        return LoadedModel(BlipForQuestionAnswering.from_pretrained(model_dir, dtype=weight_dtype(self.spec)).eval(),
                           AutoTokenizer.from_pretrained(model_dir))

    def loss(self, model: torch.nn.Module, batch: TensorBatch) -> tuple[torch.Tensor, dict[str, float]]:
        return vqa_loss(model, batch), {}

    def generate_scored(self, loaded: LoadedModel, batch: TensorBatch, settings: GenerationSettings) -> Generated:
        model = loaded.module
        return generate_scored(
            lambda **kwargs: generate_answers(model, batch, **kwargs), model.text_decoder, loaded.tokenizer,
            model.config.text_config.sep_token_id, num_beams=settings.num_beams,
            max_new_tokens=settings.max_new_tokens, confidence_temperature=settings.confidence_temperature,
        )

    def target_logits(self, model: torch.nn.Module, batch: TensorBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return answer_target_logits(model, batch)

    def save(self, model: torch.nn.Module, model_source: str, out_dir: Path) -> None:
        save_blip_folder(model, model_source, out_dir)
