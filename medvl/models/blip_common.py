"""What the BLIP recipes share (captioning, VQA, DAPT): the tiny config, the token layout, the preprocessor,
the decoder's cross-attention maps and the HF folder they save. No recipe imports another recipe; they all
import this module.

Text layout: ``[start] tokens… [end] [pad]…`` with the ids taken from the text config (``bos``/``sep``/``pad``;
questions start with the tokenizer's ``[CLS]``), the layout ``generate`` starts from, so training and decoding
agree for both the hub checkpoints and the tiny preset. Padding is masked out of the loss with -100 (the model
shifts labels itself).
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoTokenizer, BlipConfig, BlipImageProcessor

from medvl.data.preprocessing import FolderPreprocessor, ImageTextPreprocessor, UnsupportedFolder, pad_sequences
from medvl.models.blip_cross_attention import decoder_cross_attention
from medvl.models.precision import storage_dtype
from medvl.models.random_preset import build_random, random_tokenizer, real_config, release
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
    start_positions_as_sincos(model.vision_model.embeddings.position_embedding)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    BlipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(out)
    return str(out)


def start_positions_as_sincos(positions: torch.nn.Parameter, amplitude: float = 1.0) -> None:
    """Start a ViT's patch position embeddings as 2-D sine-cosine codes of each patch's column and row (MAE's fixed
    table; here only the starting value, trained like any weight), the class token's at 0.

    Why: a report must say which side a finding is on, and that is only in where the patch is. At the default
    random start (std 0.02, a few per cent of a patch's own embedding) the tiny BLIP took 600-1,500 steps to use
    position at all and named sides at chance in the quickstart; with this start the position of a patch is
    readable from the first step (in a plain loop on the quickstart's data, sides 66 % right at step 300 against
    chance before).
    """
    count, width = positions.shape[1] - 1, positions.shape[2]
    grid = math.isqrt(count)
    if grid * grid != count or width % 4:
        return  # not a square patch grid: keep the random start
    rows, columns = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                                   indexing="ij")
    quarter = width // 4
    frequencies = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))

    def code(coordinate: torch.Tensor) -> torch.Tensor:
        angles = coordinate.reshape(-1, 1) * frequencies
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    with torch.no_grad():
        positions[0, 0] = 0.0
        positions[0, 1:] = amplitude * torch.cat([code(columns), code(rows)], dim=1)


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


class BlipPreprocessor(ImageTextPreprocessor):
    """Images → ``pixel_values``; texts → ``[bos] tokens [sep]`` with the ids of the checkpoint's text config."""

    def __init__(self, model_source: str, image_size: int, max_text_length: int, max_question_length: int = 32):
        super().__init__(AutoTokenizer.from_pretrained(model_source), AutoImageProcessor.from_pretrained(model_source),
                         image_size, max_text_length)
        self.max_question_length = max_question_length
        text = BlipConfig.from_pretrained(model_source).text_config
        self.bos, self.sep, self.pad = text.bos_token_id, text.sep_token_id, text.pad_token_id

    def encode(self, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
        return encode_texts(self.tokenizer, texts, length, self.bos, self.sep, self.pad)

    @property
    def cls(self) -> int:
        """The question encoder's first token: BERT's ``[CLS]`` (the tiny tokenizer's ``[BOS]``)."""
        return self.tokenizer.cls_token_id if self.tokenizer.cls_token_id is not None else self.bos


def torch_free_factory(spec: JobSpec, model_source: str, filesystem=None) -> Callable[[], Callable] | None:
    """A factory of :class:`medvl.data.preprocessing.FolderPreprocessor` equivalent to :class:`BlipPreprocessor`
    for ``model_source`` (a Ray Data actor builds it without importing torch, transformers or this module), or
    None when the folder has no ``tokenizer.json`` or an image processor it cannot replay.

    Checked here, on the driver, on its local copy of the model (fetched once; the actors fetch theirs)."""
    from medvl.models.cache import folder_preprocessor, local_model

    data = spec.data
    local = local_model(model_source, data.endpoint_url, filesystem)
    text = BlipConfig.from_pretrained(local).text_config
    settings = {"image_size": data.image_size, "max_text_length": data.max_text_length,
                "start": text.bos_token_id, "end": text.sep_token_id, "pad": text.pad_token_id}
    try:
        FolderPreprocessor(local, **settings)
    except UnsupportedFolder:
        return None
    return functools.partial(folder_preprocessor, model_source, data.endpoint_url, filesystem, **settings)


def encode_texts(tokenizer, texts: list[str], length: int, start: int, end: int, pad: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``[start] tokens [end]`` padded with ``pad`` to ``length`` (truncating the tokens), and its mask."""
    if not texts:
        return pad_sequences([], length, pad)
    pieces = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=length - 2)["input_ids"]
    return pad_sequences([[start, *tokens, end] for tokens in pieces], length, pad)


def lm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return input_ids.masked_fill(attention_mask == 0, -100)


def blip_attention_maps(blip: torch.nn.Module, tokenizer, pixel_values: torch.Tensor, texts: list[str],
                        max_length: int) -> np.ndarray:
    """The decoder's cross-attention on the image patches while reading ``texts`` (see blip_cross_attention)."""
    text = blip.config.text_config
    ids, mask = encode_texts(tokenizer, texts, max_length, text.bos_token_id, text.sep_token_id, text.pad_token_id)
    return decoder_cross_attention(blip.vision_model, blip.text_decoder, pixel_values,
                                   torch.as_tensor(ids), torch.as_tensor(mask))


def apply_frozen_vision_policy(model: torch.nn.Module, policy: str, vision_prefix: str = "vision_model.") -> None:
    """``frozen_vision``: everything but the vision encoder trains; ``full``: everything trains."""
    if policy not in ("full", "frozen_vision"):
        raise ValueError(f"train.finetune: expected full or frozen_vision, got {policy!r}")
    for name, parameter in model.named_parameters():
        parameter.requires_grad = policy == "full" or not name.startswith(vision_prefix)


def save_blip_folder(model: torch.nn.Module, model_source: str, out_dir: Path) -> None:
    """The model plus the tokenizer and image processor it was trained with, in HF layout."""
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(model_source).save_pretrained(out_dir)
    AutoImageProcessor.from_pretrained(model_source).save_pretrained(out_dir)
