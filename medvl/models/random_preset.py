"""``model.preset: random``: a recipe's real architecture with random weights, saved like a hub checkpoint.

For throughput and memory work, where pretrained weights are irrelevant and cannot be downloaded here: the
published config numbers ship in the package (:mod:`medvl.models.architectures`), the model is built from them
in ``model.dtype`` directly (never an fp32 copy first: BLIP-2 OPT-2.7B is 7.5 GB in bf16, 15 GB in fp32) and
written with safetensors into the stage's folder, with a tokenizer trained on the job's texts (its vocabulary
is smaller than the model's, which only leaves embedding rows unused). Every worker then loads that folder as
it would a checkpoint. Memory figures measured on it are those of the real model; what it learns is not.
"""
from __future__ import annotations

import gc
from typing import Iterable

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerFast

from medvl.models.tokenizer import train_tokenizer

RANDOM_VOCAB = 8000  # enough merges that a report tokenises to about one token per word, as a real BPE does


def real_config(name_or_path: str) -> PretrainedConfig:
    """The published config of a known hub id (no download); ValueError naming ``model.name_or_path`` otherwise."""
    from medvl.models.architectures import real_config as shipped_config

    return shipped_config(name_or_path)


def random_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    return train_tokenizer(texts, vocab_size=RANDOM_VOCAB)


def build_random(model_cls: type, config: PretrainedConfig, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """``model_cls`` (a model class or an Auto class) of ``config`` with random weights, created directly in
    ``dtype``."""
    torch.manual_seed(seed)
    build = getattr(model_cls, "_from_config", None) or model_cls.from_config  # Auto classes have only the latter
    return build(config, dtype=dtype)


def release(model: torch.nn.Module) -> None:
    """Free a saved model's storage now, even if something still refers to the module (the driver should not hold
    gigabytes while the workers load the same weights from disk)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data = torch.empty(0, dtype=tensor.dtype)
    gc.collect()
