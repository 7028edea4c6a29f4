"""BLIP-2 (OPT decoder) + LoRA for chest X-ray findings.

``Blip2ForConditionalGeneration`` with peft LoRA adapters on the OPT decoder's attention projections
(``model.lora_target_modules``, default ``q_proj``/``k_proj``), matched by a regex scoped to
``language_model.`` so that a name shared with the Q-Former or the vision tower never gets an adapter. Only
the adapters train (``train.finetune: lora``): the vision encoder, the Q-Former, its projection and every
base weight stay frozen, which is what lets a 2.7B model fine-tune on one GPU (optionally with the base in
8-bit, ``model.load_in_8bit``; CUDA + bitsandbytes only).

Text layout: ``[image]×num_query_tokens [bos] findings… [eos] [pad]…``. BLIP-2 swaps the image-token
embeddings for the Q-Former outputs, so ``input_ids`` must start with exactly ``num_query_tokens`` copies
of ``config.image_token_index``; ``generate`` starts from ``[image]×Q [bos]`` (its default), so training and
decoding agree. Labels are ``input_ids`` with the image tokens and padding set to -100. BOS/EOS/PAD come
from the language model's config: EOS is what generation stops on (``\\n`` for the OPT checkpoints).

Saved model = a peft adapter folder (``save_pretrained`` of the ``PeftModel``) plus the tokenizer and image
processor; it loads with ``PeftModel.from_pretrained(Blip2ForConditionalGeneration.from_pretrained(base),
folder)``, ``base`` being the adapter's ``base_model_name_or_path``. A merged model (adapters folded into the
weights; served without peft) is written on request by :func:`export_merged`, not at every checkpoint, where
it would cost a full copy of the 2.7B base (~15 GB in fp32) each time.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel, prepare_model_for_kbit_training
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    BlipImageProcessor,
)

from medvl.data.preprocessing import ImageTextPreprocessor, pad_sequences
from medvl.models.base import Batch, GenerationSettings, LoadedModel, Recipe, TensorBatch
from medvl.models.lora import (
    ADAPTER_WEIGHTS,
    base_model_source,
    is_adapter_folder,
    load_adapter_weights,
    lora_config,
    require_8bit_support,
    scoped_targets,
    target_modules,
    widen_frozen_head,
    with_adapter,
)
from medvl.models.scored_generation import Generated, generate_scored
from medvl.models.tokenizer import train_tokenizer

IMAGE_TOKEN = "<image>"
TINY_VOCAB = 1000


def tiny_blip2_config(
    vocab_size: int, image_size: int, image_token_index: int, bos: int, eos: int, pad: int
) -> Blip2Config:
    """~0.3M parameters: a ViT of 2 layers, a 2-layer Q-Former with 8 queries, a 2-layer OPT."""
    return Blip2Config(
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": 16,
            "initializer_range": 0.02,  # the BLIP-2 default (1e-10) starts patch embeddings at ~0
        },
        qformer_config={
            "vocab_size": 32,  # the Q-Former's text embeddings are unused by Blip2ForConditionalGeneration
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "encoder_hidden_size": 64,
            "max_position_embeddings": 64,
        },
        text_config={
            "model_type": "opt",
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "word_embed_proj_dim": 64,
            "ffn_dim": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 256,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "tie_word_embeddings": False,  # see widen_frozen_head
        },
        num_query_tokens=8,
        image_token_index=image_token_index,
    )


def save_tiny_blip2(work_dir: Path, texts: Iterable[str], image_size: int) -> str:
    """A random-init tiny BLIP-2 with a tokenizer trained on ``texts`` (plus the image token), saved as a hub
    checkpoint would be; returns the folder."""
    out = work_dir / "tiny-init"
    tokenizer = train_tokenizer(texts, vocab_size=TINY_VOCAB)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    config = tiny_blip2_config(
        len(tokenizer), image_size, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config)
    widen_frozen_head(model.language_model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    BlipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(out)
    return str(out)


class Blip2Preprocessor(ImageTextPreprocessor):
    """Shard rows → ``pixel_values`` and ``[image]×Q [bos] text [eos]`` ids (see the module docstring).

    ``model_source`` may be a checkpoint or an adapter folder (which carries its own tokenizer and image processor).
    """

    def __init__(self, model_source: str, image_size: int, max_text_length: int):
        config = Blip2Config.from_pretrained(base_model_source(model_source))
        tokenizer = AutoTokenizer.from_pretrained(model_source)
        self.image_prefix = [config.image_token_index] * config.num_query_tokens
        self.bos, self.eos, self.pad = language_ids(config, tokenizer)
        # max_text_length is the whole sequence, as `encode` gets it
        super().__init__(tokenizer, AutoImageProcessor.from_pretrained(model_source), image_size,
                         len(self.image_prefix) + max_text_length)

    def encode(self, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
        room = length - len(self.image_prefix) - 2
        pieces = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=room)["input_ids"]
        return pad_sequences([[*self.image_prefix, self.bos, *tokens, self.eos] for tokens in pieces], length, self.pad)


def language_ids(config: Blip2Config, tokenizer) -> tuple[int, int, int]:
    """BOS, EOS and PAD of the language model (the tokenizer's PAD where the config names none)."""
    text = config.text_config
    pad = text.pad_token_id if text.pad_token_id is not None else tokenizer.pad_token_id
    return text.bos_token_id, text.eos_token_id, pad


def blip2_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_index: int) -> torch.Tensor:
    return input_ids.masked_fill((attention_mask == 0) | (input_ids == image_token_index), -100)


def load_blip2(source: str, load_in_8bit: bool) -> Blip2ForConditionalGeneration:
    """The base model from a hub id or folder, in 8-bit on the current GPU when asked."""
    if not Blip2Config.from_pretrained(source).use_decoder_only_language_model:
        raise ValueError(f"model.name_or_path: blip2_lora needs a decoder-only (OPT) BLIP-2 checkpoint, got {source!r}")
    if not load_in_8bit:
        return Blip2ForConditionalGeneration.from_pretrained(source)
    require_8bit_support()
    from transformers import BitsAndBytesConfig

    return Blip2ForConditionalGeneration.from_pretrained(
        source,
        quantization_config=BitsAndBytesConfig(load_in_8bit=True),
        device_map={"": torch.cuda.current_device()},
    )


def export_merged(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Fold a saved adapter into its (full-precision) base and save a plain BLIP-2 folder with tokenizer and
    image processor: ``Blip2ForConditionalGeneration.from_pretrained(out_dir)`` then needs no peft."""
    base = Blip2ForConditionalGeneration.from_pretrained(base_model_source(str(adapter_dir)))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    out = Path(out_dir)
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(out)
    AutoImageProcessor.from_pretrained(adapter_dir).save_pretrained(out)
    return out


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _config(model: torch.nn.Module) -> Blip2Config:
    return getattr(model, "module", model).config  # under DDP (several workers) the model is wrapped


class Blip2LoraRecipe(Recipe):
    def initial_model(self, work_dir: Path, train_texts: Callable[[], Iterable[str]]) -> str:
        if self.spec.model.preset == "tiny":
            return save_tiny_blip2(work_dir, train_texts(), self.spec.data.image_size)
        return self.spec.model.name_or_path

    def preprocessor(self, model_source: str) -> Callable[[Batch], Batch]:
        return Blip2Preprocessor(model_source, self.spec.data.image_size, self.spec.data.max_text_length)

    def load_for_training(self, model_source: str) -> torch.nn.Module:
        if self.spec.train.finetune != "lora":
            raise ValueError(
                f"train.finetune: the blip2_lora recipe trains LoRA adapters only, set it to lora "
                f"(got {self.spec.train.finetune!r})"
            )
        base = load_blip2(base_model_source(model_source), self.spec.model.load_in_8bit)
        if self.spec.model.load_in_8bit:
            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        targets = target_modules(self.spec.model, base.config.text_config.model_type)
        # get_peft_model / PeftModel.from_pretrained(is_trainable=True) freeze every non-adapter weight.
        return with_adapter(base, model_source, lora_config(self.spec.model, scoped_targets("language_model", targets)),
                            trainable=True)

    def load_for_inference(self, model_dir: str) -> LoadedModel:
        model = load_blip2(base_model_source(model_dir), self.spec.model.load_in_8bit)
        if is_adapter_folder(model_dir):  # else an untrained base (the eval's "untrained" baseline)
            model = PeftModel.from_pretrained(model, model_dir)
        return LoadedModel(model.eval(), AutoTokenizer.from_pretrained(model_dir))

    def loss(self, model: torch.nn.Module, batch: TensorBatch) -> tuple[torch.Tensor, dict[str, float]]:
        device = _model_device(model)
        input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        output = model(
            pixel_values=batch["pixel_values"].to(device),
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=blip2_labels(input_ids, attention_mask, _config(model).image_token_index),
        )
        return output.loss, {}

    def generate_scored(self, loaded: LoadedModel, batch: TensorBatch, settings: GenerationSettings) -> Generated:
        model = loaded.module
        blip2 = model.get_base_model() if isinstance(model, PeftModel) else model
        return generate_scored(
            model.generate, blip2.language_model, loaded.tokenizer, _config(model).text_config.eos_token_id,
            pixel_values=batch["pixel_values"].to(_model_device(model)), num_beams=settings.num_beams,
            max_new_tokens=settings.max_new_tokens,
        )

    def save(self, model: torch.nn.Module, model_source: str, out_dir: Path) -> None:
        if not isinstance(model, PeftModel):
            raise TypeError(f"blip2_lora saves peft adapters; got a {type(model).__name__}")
        model.save_pretrained(out_dir)
        AutoTokenizer.from_pretrained(model_source).save_pretrained(out_dir)
        AutoImageProcessor.from_pretrained(model_source).save_pretrained(out_dir)

    def restore(self, model: torch.nn.Module, checkpoint_dir: Path) -> None:
        if not (checkpoint_dir / ADAPTER_WEIGHTS).is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint_dir} has no {ADAPTER_WEIGHTS}")
        load_adapter_weights(model, checkpoint_dir)
