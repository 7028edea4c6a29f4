"""BLIP image captioning (``BlipForConditionalGeneration``): the ROCO recipe and the quickstart model.

Fine-tuning policies (``train.finetune``):

* ``full`` — everything trains. Best captions, most memory.
* ``decoder`` — the vision encoder is frozen and only the text decoder learns: the usual choice when the
  pretrained ViT already sees radiographs well enough, and ~2× cheaper per step.
* ``encoder`` — only the vision encoder learns (the decoder keeps its language): useful to adapt the image
  features to a new modality while keeping the pretrained captioning head.

Text layout: ``[bos] tokens… [sep] [pad]…`` with ``bos``/``sep``/``pad`` taken from the text config, the same
layout ``generate`` starts from, so training and decoding agree for both the hub checkpoints and the tiny
preset. Padding positions are masked out of the loss with -100 (the model shifts labels itself).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
)

from medvl.data.images import UnreadableImage, decode_image
from medvl.data.skips import report_skipped
from medvl.models.base import Batch, Recipe, TensorBatch
from medvl.models.blip_cross_attention import decoder_cross_attention
from medvl.models.precision import storage_dtype, weight_dtype
from medvl.models.random_preset import build_random, random_tokenizer, real_config, release
from medvl.models.scored_generation import Generated, generate_scored
from medvl.models.tokenizer import train_tokenizer
from medvl.spec import JobSpec

TINY_VOCAB = 1000


def tiny_blip_config(vocab_size: int, image_size: int, bos: int, sep: int, pad: int) -> BlipConfig:
    """~1.5M parameters: trains on 2 CPUs in minutes and can still learn which side a finding is on."""
    return BlipConfig(
        vision_config={
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": 16,
            "initializer_range": 0.02,  # the BLIP default (1e-10) starts patch embeddings at ~0
        },
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "encoder_hidden_size": 128,
            "max_position_embeddings": 256,
            "bos_token_id": bos,
            "eos_token_id": sep,
            "sep_token_id": sep,
            "pad_token_id": pad,
        },
        projection_dim=128,
    )


def save_tiny_blip(model_cls: type, work_dir: Path, texts: Iterable[str], image_size: int) -> str:
    """Build a random-init tiny BLIP of ``model_cls`` with a tokenizer trained on ``texts``; save it; return the dir."""
    out = work_dir / "tiny-init"
    tokenizer = train_tokenizer(texts, vocab_size=TINY_VOCAB)
    config = tiny_blip_config(
        len(tokenizer), image_size, tokenizer.bos_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    )
    torch.manual_seed(0)
    model = model_cls(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    BlipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(out)
    return str(out)


def save_random_blip(model_cls: type, spec: JobSpec, work_dir: Path, texts: Iterable[str]) -> str:
    """``model.preset: random``: ``model_cls`` in the published architecture of ``model.name_or_path`` with random
    weights in ``model.dtype``, its ids pointed at a tokenizer trained on ``texts`` and its ViT at
    ``data.image_size`` (see :mod:`medvl.models.random_preset`); returns the folder."""
    out = work_dir / "random-init"
    tokenizer = random_tokenizer(texts)
    config = real_config(spec.model.name_or_path)
    if not isinstance(config, BlipConfig):
        raise ValueError(f"model.name_or_path: the {spec.model.recipe} recipe needs a BLIP architecture, "
                         f"got {spec.model.name_or_path!r}")
    text = config.text_config
    text.bos_token_id, text.eos_token_id, text.sep_token_id, text.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.sep_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
    image_size = spec.data.image_size
    config.vision_config.image_size = image_size
    model = build_random(model_cls, config, storage_dtype(spec), seed=spec.train.seed)
    model.save_pretrained(out)
    release(model)
    tokenizer.save_pretrained(out)
    BlipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(out)
    return str(out)


class ImageTextPreprocessor:
    """Ray Data ``map_batches`` callable: decode, resize and normalise images; tokenise texts.

    Rows whose image does not decode are dropped and counted (see :mod:`medvl.data.skips`), so one corrupt
    file in a shard costs one sample, not the run.
    """

    def __init__(self, model_source: str, image_size: int, max_text_length: int, max_question_length: int = 32):
        self.tokenizer = AutoTokenizer.from_pretrained(model_source)
        self.image_processor = AutoImageProcessor.from_pretrained(model_source)
        self.size = {"height": image_size, "width": image_size}
        self.max_text_length = max_text_length
        self.max_question_length = max_question_length
        config = _text_config_ids(model_source)
        self.bos, self.sep, self.pad = config

    def __call__(self, batch: Batch) -> Batch:
        images, keep = [], []
        for i, data in enumerate(batch["image"]):
            try:
                images.append(decode_image(bytes(data)))
                keep.append(i)
            except UnreadableImage:
                pass
        if len(keep) < len(batch["image"]):
            report_skipped("unreadable_image", len(batch["image"]) - len(keep))
        rows = {key: np.asarray(values)[keep] for key, values in batch.items() if key != "image"}
        out: Batch = {"id": rows["id"], "text": rows["text"], "answer": rows["answer"],
                      "answer_type": rows["answer_type"], "question": rows["question"], "meta": rows["meta"]}
        if not keep:
            out["pixel_values"] = np.zeros((0, 3, self.size["height"], self.size["width"]), np.float32)
            out.update({k: np.zeros((0, self.max_text_length), np.int64) for k in ("input_ids", "attention_mask")})
            return out
        out["pixel_values"] = np.asarray(
            self.image_processor(images, size=self.size, return_tensors="np")["pixel_values"], dtype=np.float32
        )
        out["input_ids"], out["attention_mask"] = self.encode(list(rows["text"]), self.max_text_length)
        return out

    def encode(self, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
        return encode_texts(self.tokenizer, texts, length, (self.bos, self.sep, self.pad))


def encode_texts(tokenizer, texts: list[str], length: int, bos_sep_pad: tuple[int, int, int]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``[bos] tokens [sep]`` padded to ``length``: ids and attention mask."""
    bos, sep, pad = bos_sep_pad
    pieces = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=length - 2)["input_ids"]
    ids = np.full((len(texts), length), pad, dtype=np.int64)
    mask = np.zeros((len(texts), length), dtype=np.int64)
    for row, tokens in enumerate(pieces):
        sequence = [bos, *tokens, sep]
        ids[row, : len(sequence)] = sequence
        mask[row, : len(sequence)] = 1
    return ids, mask


def blip_attention_maps(blip: torch.nn.Module, tokenizer, pixel_values: torch.Tensor, texts: list[str],
                        max_length: int) -> np.ndarray:
    """The decoder's cross-attention on the image patches while reading ``texts`` (see blip_cross_attention)."""
    text = blip.config.text_config
    ids, mask = encode_texts(tokenizer, texts, max_length, (text.bos_token_id, text.sep_token_id, text.pad_token_id))
    return decoder_cross_attention(blip.vision_model, blip.text_decoder, pixel_values,
                                   torch.as_tensor(ids), torch.as_tensor(mask))


def _text_config_ids(model_source: str) -> tuple[int, int, int]:
    text = BlipConfig.from_pretrained(model_source).text_config
    return text.bos_token_id, text.sep_token_id, text.pad_token_id


def lm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return input_ids.masked_fill(attention_mask == 0, -100)


class BlipCaptionRecipe(Recipe):
    task = "caption"

    def initial_model(self, work_dir: Path, train_texts: Callable[[], Iterable[str]]) -> str:
        if self.spec.model.preset == "tiny":
            return save_tiny_blip(BlipForConditionalGeneration, work_dir, train_texts(), self.spec.data.image_size)
        if self.spec.model.preset == "random":
            return save_random_blip(BlipForConditionalGeneration, self.spec, work_dir, train_texts())
        return self.spec.model.name_or_path

    def preprocessor(self, model_source: str) -> Callable[[Batch], Batch]:
        data = self.spec.data
        return ImageTextPreprocessor(model_source, data.image_size, data.max_text_length, data.max_question_length)

    def load_for_training(self, model_source: str) -> torch.nn.Module:
        model = BlipForConditionalGeneration.from_pretrained(model_source, dtype=weight_dtype(self.spec))
        apply_blip_finetune_policy(model, self.spec.train.finetune)
        return model

    def load_for_inference(self, model_dir: str) -> torch.nn.Module:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return BlipForConditionalGeneration.from_pretrained(model_dir, dtype=weight_dtype(self.spec)).eval()

    def loss(self, model: torch.nn.Module, batch: TensorBatch) -> tuple[torch.Tensor, dict[str, float]]:
        output = model(
            pixel_values=batch["pixel_values"],
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=lm_labels(batch["input_ids"], batch["attention_mask"]),
        )
        return output.loss, {}

    def generate_scored(self, model: torch.nn.Module, batch: TensorBatch) -> Generated:
        settings = self.spec.eval
        return generate_scored(
            model.generate, model.text_decoder, self.tokenizer, model.config.text_config.sep_token_id,
            pixel_values=batch["pixel_values"], num_beams=settings.num_beams, max_new_tokens=settings.max_new_tokens,
        )

    def attention_maps(self, model: torch.nn.Module, batch: TensorBatch, texts: list[str]) -> np.ndarray:
        return blip_attention_maps(model, self.tokenizer, batch["pixel_values"], texts,
                                   self.spec.data.max_text_length)

    def save(self, model: torch.nn.Module, model_source: str, out_dir: Path) -> None:
        model.save_pretrained(out_dir)
        AutoTokenizer.from_pretrained(model_source).save_pretrained(out_dir)
        AutoImageProcessor.from_pretrained(model_source).save_pretrained(out_dir)


def apply_blip_finetune_policy(model: torch.nn.Module, policy: str) -> None:
    """Freeze exactly the part the policy does not train (see the module docstring)."""
    trainable_prefix = {"full": "", "decoder": "text_decoder.", "encoder": "vision_model."}
    if policy not in trainable_prefix:
        raise ValueError(f"train.finetune: expected one of full, decoder, encoder for BLIP, got {policy!r}")
    prefix = trainable_prefix[policy]
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith(prefix)
