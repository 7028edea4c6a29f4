"""BLIP-2 (OPT decoder) for chest X-ray findings: LoRA or full fine-tuning (recipe ``blip2``).

``Blip2ForConditionalGeneration``, with one of three policies (``train.finetune``):

* ``lora`` — peft LoRA adapters on the OPT decoder's attention projections (``model.lora_target_modules``,
  default ``q_proj``/``k_proj``), matched by a regex scoped to ``language_model.`` so that a name shared with
  the Q-Former or the vision tower never gets an adapter. Only the adapters train: the vision encoder, the
  Q-Former, its projection and every base weight stay frozen, which is what lets a 2.7B model fine-tune on one
  GPU (optionally with the base in 8-bit, ``model.load_in_8bit``, or in 4-bit NF4 as QLoRA trains,
  ``model.load_in_4bit``; CUDA + bitsandbytes only, both refused elsewhere with what to do).
* ``frozen_vision`` — the language model, the Q-Former, its query tokens and the projection train; the ViT
  stays frozen (:func:`apply_blip2_policy`).
* ``full`` — everything trains, the ViT too. Full fine-tuning of 3.7B parameters needs ZeRO-3 across GPUs
  (``train.strategy: deepspeed``; see jobs/mimic_blip2_full.yaml): AdamW's fp32 state alone is ~45 GB.

The recipe was called ``blip2_lora`` when LoRA was all it trained; that name still selects it.

Text layout: ``[image]×num_query_tokens [bos] findings… [eos] [pad]…``. BLIP-2 swaps the image-token
embeddings for the Q-Former outputs, so ``input_ids`` must start with exactly ``num_query_tokens`` copies
of ``config.image_token_index``; ``generate`` starts from ``[image]×Q [bos]`` (its default), so training and
decoding agree. Labels are ``input_ids`` with the image tokens and padding set to -100. BOS/EOS/PAD come
from the language model's config: EOS is what generation stops on (``\\n`` for the OPT checkpoints).

Saved model under ``lora`` = a peft adapter folder (``save_pretrained`` of the ``PeftModel``) plus the tokenizer
and image processor; it loads with ``PeftModel.from_pretrained(Blip2ForConditionalGeneration.from_pretrained(base),
folder)``, ``base`` being the adapter's ``base_model_name_or_path``. A merged model (adapters folded into the
weights; served without peft) is written on request by :func:`export_merged`, not at every checkpoint, where
it would cost a full copy of the 2.7B base (~7.5 GB in bf16) each time. Under ``full``/``frozen_vision`` the
saved model is a plain BLIP-2 folder (``Blip2ForConditionalGeneration.from_pretrained``). A full fine-tune may
start from an adapter folder (a LoRA stage's output): the adapter is merged into the base first.

Weights load in ``model.dtype`` (see :mod:`medvl.models.precision`); in float16 HF keeps the Q-Former and the
query tokens in fp32 (``_keep_in_fp32_modules``; bfloat16 loads them in bf16). ``model.preset: random`` builds
the published architecture of ``model.name_or_path`` (e.g. ``Salesforce/blip2-opt-2.7b``) with random weights.
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
from medvl.models.base import Batch, GenerationSettings, LoadedModel, Recipe, TensorBatch, shifted_targets
from medvl.models.lora import (
    ADAPTER_WEIGHTS,
    base_model_source,
    is_adapter_folder,
    load_adapter_weights,
    lora_config,
    quantisation_config,
    require_quantisation_support,
    scoped_targets,
    target_modules,
    widen_frozen_head,
    with_adapter,
)
from medvl.models.precision import storage_dtype, weight_dtype
from medvl.models.random_preset import build_random, random_tokenizer, real_config, release
from medvl.models.scored_generation import Generated, generate_scored
from medvl.models.tokenizer import train_tokenizer
from medvl.models.weights import load_full_weights
from medvl.spec import JobSpec

IMAGE_TOKEN = "<image>"
TINY_VOCAB = 1000
POLICIES = ("lora", "frozen_vision", "full")
VISION_PREFIX = "vision_model."


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


def random_blip2_config(name_or_path: str, tokenizer, image_size: int) -> Blip2Config:
    """The published architecture of ``name_or_path``, its ids pointed at ``tokenizer`` and its ViT at
    ``image_size`` px (the published size, 224, keeps the architecture exact)."""
    config = real_config(name_or_path)
    if not isinstance(config, Blip2Config) or not config.use_decoder_only_language_model:
        raise ValueError(f"model.name_or_path: the blip2 recipe needs a decoder-only (OPT) BLIP-2 architecture, "
                         f"got {name_or_path!r}")
    config.image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text = config.text_config
    text.bos_token_id, text.eos_token_id, text.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    config.vision_config.image_size = image_size
    return config


def save_random_blip2(spec: JobSpec, work_dir: Path, texts: Iterable[str]) -> str:
    """``model.preset: random``: the real architecture with random weights in ``model.dtype`` (see
    :mod:`medvl.models.random_preset`), a tokenizer trained on ``texts`` and an image processor; returns the
    folder."""
    out = work_dir / "random-init"
    tokenizer = random_tokenizer(texts)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    config = random_blip2_config(spec.model.name_or_path, tokenizer, spec.data.image_size)
    model = build_random(Blip2ForConditionalGeneration, config, storage_dtype(spec), seed=spec.train.seed)
    model.save_pretrained(out)
    release(model)
    tokenizer.save_pretrained(out)
    image_size = spec.data.image_size
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


def prompt_ids(config: Blip2Config, tokenizer, prompt: str) -> torch.Tensor:
    """``[image]×Q [bos] prompt``, one row: what generation continues after, as BLIP-2's zero-shot prompting does."""
    tokens = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    image = [config.image_token_index] * config.num_query_tokens
    return torch.tensor([[*image, config.text_config.bos_token_id, *tokens]])


def blip2_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_index: int) -> torch.Tensor:
    return input_ids.masked_fill((attention_mask == 0) | (input_ids == image_token_index), -100)


def load_blip2(source: str, load_in_8bit: bool, dtype: torch.dtype = torch.float32,
               load_in_4bit: bool = False) -> Blip2ForConditionalGeneration:
    """The base model from a hub id or folder, in ``dtype`` (8- or 4-bit on the current GPU when asked; the 4-bit
    weights compute in ``dtype``)."""
    if not Blip2Config.from_pretrained(source).use_decoder_only_language_model:
        raise ValueError(f"model.name_or_path: the blip2 recipe needs a decoder-only (OPT) BLIP-2 checkpoint, "
                         f"got {source!r}")
    quantisation = "8bit" if load_in_8bit else "4bit" if load_in_4bit else ""
    if not quantisation:
        return Blip2ForConditionalGeneration.from_pretrained(source, dtype=dtype)
    require_quantisation_support(quantisation)
    return Blip2ForConditionalGeneration.from_pretrained(
        source,
        quantization_config=quantisation_config(quantisation, dtype),
        device_map={"": torch.cuda.current_device()},
        dtype=dtype,
    )


def apply_blip2_policy(model: torch.nn.Module, policy: str) -> None:
    """The non-LoRA policies, by module name (works on the meta device; loads nothing): ``full`` trains every
    weight, ``frozen_vision`` every weight but the ViT's (language model, Q-Former, query tokens, projection)."""
    if policy not in ("full", "frozen_vision"):
        raise ValueError(f"train.finetune: apply_blip2_policy takes full or frozen_vision (lora goes through peft), "
                         f"got {policy!r}")
    for name, parameter in model.named_parameters():
        parameter.requires_grad = policy == "full" or not name.startswith(VISION_PREFIX)


def check_policy(policy: str, load_in_8bit: bool, load_in_4bit: bool = False) -> None:
    if policy not in POLICIES:
        raise ValueError(f"train.finetune: expected lora, frozen_vision or full for the blip2 recipe, got {policy!r}")
    for bits, asked in (("8", load_in_8bit), ("4", load_in_4bit)):
        if asked and policy != "lora":
            raise ValueError(f"model.load_in_{bits}bit: expected false with train.finetune {policy} ({bits}-bit "
                             "weights cannot train; only LoRA adapters beside them can), got true")


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


class Blip2Recipe(Recipe):
    def initial_model(self, work_dir: Path, train_texts: Callable[[], Iterable[str]]) -> str:
        if self.spec.model.preset == "tiny":
            return save_tiny_blip2(work_dir, train_texts(), self.spec.data.image_size)
        if self.spec.model.preset == "random":
            return save_random_blip2(self.spec, work_dir, train_texts())
        return self.spec.model.name_or_path

    def preprocessor(self, model_source: str) -> Callable[[Batch], Batch]:
        return Blip2Preprocessor(model_source, self.spec.data.image_size, self.spec.data.max_text_length)

    def load_for_training(self, model_source: str) -> torch.nn.Module:
        policy, settings = self.spec.train.finetune, self.spec.model
        check_policy(policy, settings.load_in_8bit, settings.load_in_4bit)
        base = load_blip2(base_model_source(model_source), settings.load_in_8bit, weight_dtype(self.spec),
                          load_in_4bit=settings.load_in_4bit)
        if policy != "lora":
            if is_adapter_folder(model_source):  # a LoRA stage's output: fold its adapter in, then train it all
                base = PeftModel.from_pretrained(base, model_source).merge_and_unload()
            apply_blip2_policy(base, policy)
            return base
        if settings.quantisation:
            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        targets = target_modules(settings, base.config.text_config.model_type)
        # get_peft_model / PeftModel.from_pretrained(is_trainable=True) freeze every non-adapter weight.
        return with_adapter(base, model_source, lora_config(settings, scoped_targets("language_model", targets)),
                            trainable=True)

    def load_for_inference(self, model_dir: str) -> LoadedModel:
        settings = self.spec.model
        model = load_blip2(base_model_source(model_dir), settings.load_in_8bit, weight_dtype(self.spec),
                           load_in_4bit=settings.load_in_4bit)
        if is_adapter_folder(model_dir):  # else a plain folder: fully fine-tuned, or an untrained base
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
        """Findings after ``[image]×Q [bos]``, or after ``[image]×Q [bos] prompt`` when ``settings.prompt`` is set
        (only the generated tokens are returned)."""
        model = loaded.module
        blip2 = model.get_base_model() if isinstance(model, PeftModel) else model
        pixel_values = batch["pixel_values"].to(_model_device(model))
        prompt = {}
        if settings.prompt:
            ids = prompt_ids(_config(model), loaded.tokenizer, settings.prompt).to(pixel_values.device)
            prompt = {"input_ids": ids.repeat(len(pixel_values), 1)}
            prompt["attention_mask"] = torch.ones_like(prompt["input_ids"])
        return generate_scored(
            model.generate, blip2.language_model, loaded.tokenizer, _config(model).text_config.eos_token_id,
            pixel_values=pixel_values, num_beams=settings.num_beams, max_new_tokens=settings.max_new_tokens,
            confidence_temperature=settings.confidence_temperature, **prompt,
        )

    def target_logits(self, model: torch.nn.Module, batch: TensorBatch) -> tuple[torch.Tensor, torch.Tensor]:
        device = _model_device(model)
        input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        output = model(pixel_values=batch["pixel_values"].to(device), input_ids=input_ids,
                       attention_mask=attention_mask)
        return shifted_targets(output.logits, blip2_labels(input_ids, attention_mask, _config(model).image_token_index))

    def save(self, model: torch.nn.Module, model_source: str, out_dir: Path) -> None:
        """An adapter folder under LoRA, a plain BLIP-2 folder otherwise; with the tokenizer and image processor."""
        if self.spec.train.finetune == "lora" and not isinstance(model, PeftModel):
            raise TypeError(f"blip2 under train.finetune lora saves peft adapters; got a {type(model).__name__}")
        model.save_pretrained(out_dir)
        AutoTokenizer.from_pretrained(model_source).save_pretrained(out_dir)
        AutoImageProcessor.from_pretrained(model_source).save_pretrained(out_dir)

    def restore(self, model: torch.nn.Module, checkpoint_dir: Path) -> None:
        if isinstance(model, PeftModel):
            if not (checkpoint_dir / ADAPTER_WEIGHTS).is_file():
                raise FileNotFoundError(f"checkpoint {checkpoint_dir} has no {ADAPTER_WEIGHTS}")
            load_adapter_weights(model, checkpoint_dir)
            return
        load_full_weights(model, checkpoint_dir)


Blip2LoraRecipe = Blip2Recipe  # the class's name while the recipe trained LoRA only
