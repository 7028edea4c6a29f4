"""Two-stage soft-prompt report generation: ResNet-50 features → a one-layer mapper → a prefix for a causal LM.

Model (:class:`SoftPromptModel`):

* ``vision`` — ``transformers.ResNetModel``; its last stage's feature map (C×h×w, 2048×7×7 for ResNet-50
  at 224 px) is flattened into h·w image tokens, plus a fixed 2-D sine/cosine position code: the mapper's
  cross-attention is otherwise blind to where a feature is, and left/right is half of a chest report.
* ``mapper`` — :class:`PrefixMapper`: ``model.num_prefix_tokens`` learned queries go through ONE
  ``torch.nn.TransformerDecoderLayer`` (self-attention among the queries, cross-attention to the image
  tokens, at the vision width C) and a linear map into the LM's embedding space.
* ``lm`` — any ``AutoModelForCausalLM``. Input: ``inputs_embeds = [prefix; embed([bos] text [eos])]``; labels are
  -100 on the prefix, the BOS and padding.

What trains is two choices:

* The LM (``model.lm_lora``): ``true`` (default) wraps it in peft LoRA (``model.lora_target_modules``, or per
  model type: GPT-2 ``c_attn``, LLaMA ``q_proj``/``v_proj``) and its base weights never train; ``false`` trains
  every LM weight (full fine-tuning: OpenLLaMA-7B needs ZeRO-3, see jobs/mimic_openllama_full.yaml).
* The vision encoder (``train.finetune``): ``frozen_vision`` (stage 1) keeps the ResNet frozen, in eval mode so
  that its BatchNorm statistics stay put too; ``full`` (stage 2, ``start_from`` stage 1) also trains it. The
  mapper always trains. The job spec chains the stages. (``lora`` is not a value here: ``model.lm_lora`` says it.)

:func:`apply_softprompt_policy` applies both by module name (on the meta device too, for ``medvl plan``).

Saved folder (HF pieces, each loadable on its own)::

    medvl_softprompt.json   {"base_lm": hub id or folder of the LM, "num_prefix_tokens", "vision_dim", "lm_dim",
                             "mapper_heads", "mapper_ffn_dim"}
    vision/                 ResNetModel.save_pretrained + the image processor
    lm_adapter/             with LoRA: the peft adapter (PeftModel.from_pretrained(AutoModelForCausalLM…(base_lm), it))
    lm/                     without LoRA: the whole fine-tuned LM (AutoModelForCausalLM.from_pretrained(it))
    mapper.safetensors      PrefixMapper state dict
    tokenizer files         the LM's tokenizer

With LoRA the LM's base weights are referenced (``base_lm``), not copied: a 7B LM would otherwise cost ~13 GB per
checkpoint. A folder of either kind starts the next stage: an adapter is merged into its base when that stage
trains the whole LM, and a fully trained ``lm/`` becomes the base of a fresh adapter when it trains LoRA.
The tiny and random presets save their random base LM inside their own start folder.

Weights load in ``model.dtype`` (:mod:`medvl.models.precision`); pixels are cast to the ResNet's dtype here.
Gradient checkpointing (:meth:`SoftPromptModel.enable_gradient_checkpointing`) uses the LM's own and wraps the
mapper in ``torch.utils.checkpoint``; the ResNet is left alone: recomputing its BatchNorm layers in train mode
would update their running statistics twice per step.

Visual grounding check: :meth:`SoftPromptRecipe.extra_eval_metrics` reports, per LM layer, the share of
attention mass the text positions put on the prefix (``prefix_attention_share_layer_<i>`` and their mean
``prefix_attention_share``). It needs eager attention, which :meth:`load_for_inference` asks for.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel, get_peft_model
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    ConvNextImageProcessor,
    GPT2Config,
    GPT2LMHeadModel,
    ResNetConfig,
    ResNetModel,
)

from medvl.data.preprocessing import ImageTextPreprocessor, pad_sequences
from medvl.models.base import Batch, GenerationSettings, LoadedModel, Recipe, TensorBatch, shifted_targets
from medvl.models.checkpointing import enable_hf_checkpointing, run_checkpointed
from medvl.models.lora import (
    load_adapter_weights,
    lora_config,
    target_modules,
    widen_frozen_head,
)
from medvl.models.precision import storage_dtype, weight_dtype
from medvl.models.random_preset import build_random, random_tokenizer, real_config, release
from medvl.models.scored_generation import Generated, generate_scored
from medvl.models.tokenizer import train_tokenizer
from medvl.models.weights import load_full_weights
from medvl.spec import JobSpec, ModelSpec

CONFIG_FILE = "medvl_softprompt.json"
MAPPER_FILE = "mapper.safetensors"
VISION_DIR = "vision"
ADAPTER_DIR = "lm_adapter"
LM_DIR = "lm"
TINY_VOCAB = 1000
POLICIES = ("frozen_vision", "full")


@dataclass
class SoftPromptConfig:
    base_lm: str  # hub id or folder of the causal LM's base weights
    num_prefix_tokens: int
    vision_dim: int
    lm_dim: int
    mapper_heads: int
    mapper_ffn_dim: int


def grid_position_code(height: int, width: int, dim: int) -> torch.Tensor:
    """(height·width, dim) fixed sine/cosine code of each grid cell's row and column (zeros where dim % 4)."""
    quarter = dim // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / max(quarter, 1))
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    parts = []
    for coordinate in (rows, cols):
        angles = coordinate.flatten()[:, None].float() * frequencies
        parts += [angles.sin(), angles.cos()]
    code = torch.cat(parts, dim=1)
    return nn.functional.pad(code, (0, dim - code.shape[1]))


class PrefixMapper(nn.Module):
    """(B, N, vision_dim) image tokens → (B, P, lm_dim) prefix: P learned queries, one decoder layer, a linear map."""

    def __init__(self, num_prefix_tokens: int, vision_dim: int, lm_dim: int, heads: int, ffn_dim: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_prefix_tokens, vision_dim))
        self.decoder = nn.TransformerDecoderLayer(
            vision_dim, heads, ffn_dim, dropout=0.1, batch_first=True, norm_first=True
        )
        self.project = nn.Linear(vision_dim, lm_dim)

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        queries = self.queries.expand(image_tokens.shape[0], -1, -1)
        return self.project(self.decoder(queries, image_tokens))


def mapper_heads(width: int) -> int:
    return next(h for h in (8, 4, 2, 1) if width % h == 0)


class SoftPromptModel(nn.Module):
    def __init__(self, vision: ResNetModel, mapper: PrefixMapper, lm: nn.Module, config: SoftPromptConfig):
        super().__init__()
        self.vision, self.mapper, self.lm, self.config = vision, mapper, lm, config
        self.bos, self.eos, self.pad = special_ids(lm.config)
        self.checkpoint_mapper = False

    def train(self, mode: bool = True) -> SoftPromptModel:
        super().train(mode)
        if not any(p.requires_grad for p in self.vision.parameters()):
            self.vision.eval()  # a frozen encoder's BatchNorm running statistics must not drift either
        return self

    def enable_gradient_checkpointing(self) -> None:
        """The LM's own checkpointing, and the mapper's through torch.utils.checkpoint (see the module docstring)."""
        enable_hf_checkpointing(self.lm)
        self.checkpoint_mapper = True

    def prefix(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.vision(pixel_values=pixel_values.to(self.vision.dtype)).last_hidden_state  # (B, C, h, w)
        _, channels, height, width = features.shape
        tokens = features.flatten(2).transpose(1, 2)
        tokens = tokens + grid_position_code(height, width, channels).to(tokens)
        return run_checkpointed(self.mapper, tokens, enabled=self.checkpoint_mapper)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None, output_attentions: bool = False):
        prefix = self.prefix(pixel_values)
        embeds = self.lm.get_input_embeddings()(input_ids)
        inputs_embeds = torch.cat([prefix.to(embeds.dtype), embeds], dim=1)
        prefix_shape = prefix.shape[:2]
        mask = torch.cat([attention_mask.new_ones(prefix_shape), attention_mask], dim=1)
        if labels is not None:
            labels = torch.cat([labels.new_full(prefix_shape, -100), labels], dim=1)
        return self.lm(inputs_embeds=inputs_embeds, attention_mask=mask, labels=labels,
                       output_attentions=output_attentions)

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, num_beams: int, max_new_tokens: int, **generate_kwargs):
        """Greedy (1 beam) or beam search from ``[prefix; bos]``; returns only the new tokens (or, with
        ``return_dict_in_generate``, HF's output holding them)."""
        prefix = self.prefix(pixel_values)
        bos = torch.full((prefix.shape[0], 1), self.bos, dtype=torch.long, device=prefix.device)
        embeds = self.lm.get_input_embeddings()(bos)
        inputs_embeds = torch.cat([prefix.to(embeds.dtype), embeds], dim=1)
        return self.lm.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=prefix.device),
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.eos,
            pad_token_id=self.pad,
            **generate_kwargs,
        )


def special_ids(lm_config) -> tuple[int, int, int]:
    """BOS, EOS, PAD of a causal LM (PAD = EOS where it has none, as GPT-2 and LLaMA; it is masked anyway)."""
    eos = lm_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    pad = lm_config.pad_token_id if lm_config.pad_token_id is not None else eos
    bos = lm_config.bos_token_id if lm_config.bos_token_id is not None else eos
    return bos, eos, pad


def text_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Padding and the leading BOS (which the model never has to predict) become -100."""
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, 0] = -100
    return labels


def prefix_attention_share(attentions: tuple[torch.Tensor, ...], prefix_length: int,
                           text_mask: torch.Tensor) -> list[float]:
    """Per layer: attention mass on the first ``prefix_length`` keys, averaged over heads and over the real
    (mask 1) text positions that follow the prefix. ``attentions``: per layer (B, heads, T, T)."""
    weights = text_mask.to(torch.float64)
    shares = []
    for layer in attentions:
        on_prefix = layer[:, :, prefix_length:, :prefix_length].sum(-1).mean(1).to(torch.float64)  # (B, L)
        shares.append(float((on_prefix * weights).sum() / weights.sum()))
    return shares


# --------------------------------------------------------------------------------------------- sources


@dataclass
class Sources:
    """Where each piece of a model comes from: a folder :meth:`SoftPromptRecipe.save` wrote, or hub ids/folders."""

    base_lm: str  # the LM's weights: a hub id or folder (the saved lm/ when the whole LM was trained)
    vision: str
    tokenizer: str
    saved: Path | None  # the save folder (mapper inside), None when starting fresh
    adapter: Path | None = None  # the saved LoRA adapter on base_lm, if the LM was trained through one


def resolve_sources(model_source: str, spec: JobSpec) -> Sources:
    folder = Path(model_source)
    if (folder / CONFIG_FILE).is_file():
        if (folder / LM_DIR).is_dir():
            return Sources(str(folder / LM_DIR), str(folder / VISION_DIR), str(folder), folder)
        config = json.loads((folder / CONFIG_FILE).read_text())
        return Sources(config["base_lm"], str(folder / VISION_DIR), str(folder), folder, folder / ADAPTER_DIR)
    return Sources(model_source, spec.model.vision_name_or_path, model_source, None)


class SquareImages:
    """Resize to ``size``×``size`` ourselves, then let the checkpoint's processor rescale and normalise.

    ResNet-50's processor (ConvNext) only knows "shortest edge + centre crop", which would cut the costophrenic
    angles off a radiograph and takes no height/width.
    """

    def __init__(self, processor, size: int):
        self.processor, self.side = processor, size

    def __call__(self, images: list[Image.Image], size=None, return_tensors: str = "np"):
        resized = [image.resize((self.side, self.side), Image.Resampling.BICUBIC) for image in images]
        return self.processor(resized, do_resize=False, return_tensors=return_tensors)


class SoftPromptPreprocessor(ImageTextPreprocessor):
    """Shard rows → ``pixel_values`` and ``[bos] text [eos]`` ids for the LM (ids from the causal LM's config)."""

    def __init__(self, sources: Sources, image_size: int, max_text_length: int):
        super().__init__(AutoTokenizer.from_pretrained(sources.tokenizer),
                         SquareImages(AutoImageProcessor.from_pretrained(sources.vision), image_size),
                         image_size, max_text_length)
        self.bos, self.eos, self.pad = special_ids(AutoConfig.from_pretrained(sources.base_lm))

    def encode(self, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
        pieces = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=length - 2)["input_ids"]
        return pad_sequences([[self.bos, *tokens, self.eos] for tokens in pieces], length, self.pad)


# --------------------------------------------------------------------------------------------- recipe


class SoftPromptRecipe(Recipe):
    def initial_model(self, work_dir: Path, train_texts: Callable[[], Iterable[str]]) -> str:
        if self.spec.model.preset == "tiny":
            return save_tiny_softprompt(self, work_dir, train_texts())
        if self.spec.model.preset == "random":
            return save_random_softprompt(self, work_dir, train_texts())
        return self.spec.model.name_or_path

    def preprocessor(self, model_source: str) -> Callable[[Batch], Batch]:
        data = self.spec.data
        return SoftPromptPreprocessor(resolve_sources(model_source, self.spec), data.image_size, data.max_text_length)

    def build(self, sources: Sources, trainable: bool, lm_lora: bool, eager_attention: bool = False) -> SoftPromptModel:
        """The model from ``sources`` in ``model.dtype``: saved mapper/adapter when there are any, fresh (seeded)
        ones otherwise; ``lm_lora`` says whether the LM trains through LoRA (an adapter is merged otherwise)."""
        dtype = weight_dtype(self.spec)
        vision = ResNetModel.from_pretrained(sources.vision, dtype=dtype)
        attention = {"attn_implementation": "eager"} if eager_attention else {}
        lm = AutoModelForCausalLM.from_pretrained(sources.base_lm, dtype=dtype, **attention)
        if sources.adapter is not None:
            lm = PeftModel.from_pretrained(lm, sources.adapter, is_trainable=trainable)
            if not lm_lora:
                lm = lm.merge_and_unload()
        saved_config = None
        if sources.saved is not None:  # its base_lm becomes this model's: a fully trained lm/ may now carry LoRA
            saved = json.loads((sources.saved / CONFIG_FILE).read_text())
            saved_config = SoftPromptConfig(**{**saved, "base_lm": sources.base_lm})
        fresh_lora = lm_lora and sources.adapter is None
        model = assemble_softprompt(vision, lm, self.spec.model, sources.base_lm, self.spec.train.seed,
                                    config=saved_config, fresh_lora=fresh_lora)
        if sources.saved is not None:
            model.mapper.load_state_dict(load_file(sources.saved / MAPPER_FILE))
        model.mapper.to(dtype)
        return model

    def load_for_training(self, model_source: str) -> torch.nn.Module:
        model = self.build(resolve_sources(model_source, self.spec), trainable=True, lm_lora=self.spec.model.lm_lora)
        apply_softprompt_policy(model, self.spec.train.finetune)
        return model

    def load_for_inference(self, model_dir: str) -> LoadedModel:
        sources = resolve_sources(model_dir, self.spec)
        # As saved: through its adapter if it has one, else the plain LM (a fresh adapter would change nothing).
        return LoadedModel(self.build(sources, trainable=False, lm_lora=sources.adapter is not None,
                                      eager_attention=True).eval(),
                           AutoTokenizer.from_pretrained(sources.tokenizer))

    def loss(self, model: torch.nn.Module, batch: TensorBatch) -> tuple[torch.Tensor, dict[str, float]]:
        output = model(
            pixel_values=batch["pixel_values"],
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=text_labels(batch["input_ids"], batch["attention_mask"]),
        )
        return output.loss, {}

    def generate_scored(self, loaded: LoadedModel, batch: TensorBatch, settings: GenerationSettings) -> Generated:
        model = loaded.module
        return generate_scored(model.generate, model.lm, loaded.tokenizer, model.eos,
                               pixel_values=batch["pixel_values"], num_beams=settings.num_beams,
                               max_new_tokens=settings.max_new_tokens,
                               confidence_temperature=settings.confidence_temperature)

    def target_logits(self, model: torch.nn.Module, batch: TensorBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The LM's logits over ``[prefix; text]``, at the text tokens the loss scores (after the BOS)."""
        output = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"])
        labels = text_labels(batch["input_ids"], batch["attention_mask"])
        prefix = output.logits.shape[1] - labels.shape[1]
        return shifted_targets(output.logits, torch.cat([labels.new_full((labels.shape[0], prefix), -100), labels], 1))

    def extra_eval_metrics(self, model: torch.nn.Module, batch: TensorBatch) -> dict[str, float]:
        output = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"], output_attentions=True)
        if not output.attentions:
            raise RuntimeError(
                "prefix_attention_share needs attention weights: load the LM with attn_implementation='eager'"
            )
        shares = prefix_attention_share(output.attentions, model.config.num_prefix_tokens, batch["attention_mask"])
        metrics = {f"prefix_attention_share_layer_{i}": share for i, share in enumerate(shares)}
        metrics["prefix_attention_share"] = sum(shares) / len(shares)
        return metrics

    def save(self, model: torch.nn.Module, model_source: str, out_dir: Path) -> None:
        write_softprompt(model, resolve_sources(model_source, self.spec), Path(out_dir))

    def restore(self, model: torch.nn.Module, checkpoint_dir: Path) -> None:
        model.vision.load_state_dict(load_file(checkpoint_dir / VISION_DIR / "model.safetensors"))
        model.mapper.load_state_dict(load_file(checkpoint_dir / MAPPER_FILE))
        if isinstance(model.lm, PeftModel):
            load_adapter_weights(model.lm, checkpoint_dir / ADAPTER_DIR)
        else:
            load_full_weights(model.lm, checkpoint_dir / LM_DIR)


def assemble_softprompt(vision: nn.Module, lm: nn.Module, settings: ModelSpec, base_lm: str, seed: int,
                        config: SoftPromptConfig | None = None, fresh_lora: bool = False) -> SoftPromptModel:
    """A :class:`SoftPromptModel` around an already built ResNet and LM: a fresh mapper (seeded: the same on every
    worker and every run) and, with ``fresh_lora``, a fresh LoRA adapter on the LM. Loads nothing, so it also
    builds on the meta device (``with torch.device("meta")``) for planning."""
    if config is None:
        width = vision.config.hidden_sizes[-1]
        config = SoftPromptConfig(base_lm, settings.num_prefix_tokens, width,
                                  lm.get_input_embeddings().embedding_dim, mapper_heads(width), 4 * width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mapper = PrefixMapper(config.num_prefix_tokens, config.vision_dim, config.lm_dim, config.mapper_heads,
                              config.mapper_ffn_dim)
        if fresh_lora:
            model_type = lm.config.model_type
            targets = target_modules(settings, model_type)
            lm = get_peft_model(lm, lora_config(settings, targets, fan_in_fan_out=model_type == "gpt2"))
    return SoftPromptModel(vision, mapper, lm, config)


def apply_softprompt_policy(model: SoftPromptModel, policy: str) -> None:
    """By module name (works on the meta device): the mapper always trains; the LM's LoRA weights when it has
    an adapter, else every LM weight; the vision encoder only under ``full``."""
    if policy not in POLICIES:
        raise ValueError(f"train.finetune: expected frozen_vision (stage 1) or full (stage 2) for softprompt_llm "
                         f"(model.lm_lora picks LoRA or the whole LM), got {policy!r}")
    for parameter in model.vision.parameters():
        parameter.requires_grad = policy == "full"
    for parameter in model.mapper.parameters():
        parameter.requires_grad = True
    through_lora = isinstance(model.lm, PeftModel)
    for name, parameter in model.lm.named_parameters():
        parameter.requires_grad = ".lora_" in name if through_lora else True


def write_softprompt(model: SoftPromptModel, sources: Sources, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(asdict(model.config), indent=2))
    model.vision.save_pretrained(out / VISION_DIR)
    AutoImageProcessor.from_pretrained(sources.vision).save_pretrained(out / VISION_DIR)
    tokenizer = AutoTokenizer.from_pretrained(sources.tokenizer)
    if isinstance(model.lm, PeftModel):
        model.lm.save_pretrained(out / ADAPTER_DIR)
    else:  # the whole LM trained: a plain causal-LM folder, loadable on its own
        model.lm.save_pretrained(out / LM_DIR)
        tokenizer.save_pretrained(out / LM_DIR)
    save_file({k: v.contiguous() for k, v in model.mapper.state_dict().items()}, out / MAPPER_FILE)
    tokenizer.save_pretrained(out)


# --------------------------------------------------------------------------------------------- tiny preset


def tiny_resnet_config() -> ResNetConfig:
    return ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic")


def tiny_gpt2_config(vocab_size: int, bos: int, eos: int, pad: int) -> GPT2Config:
    return GPT2Config(
        vocab_size=vocab_size, n_positions=256, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
        tie_word_embeddings=False,  # see widen_frozen_head
    )


def save_tiny_parts(folder: Path, texts: Iterable[str], image_size: int) -> tuple[str, str]:
    """A random tiny GPT-2 (+ a tokenizer trained on ``texts``) and a random tiny ResNet (+ image processor),
    each saved as its hub checkpoint would be; returns (lm folder, vision folder)."""
    tokenizer = train_tokenizer(texts, vocab_size=TINY_VOCAB)
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(tiny_gpt2_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                                          tokenizer.pad_token_id))
    widen_frozen_head(lm)
    lm_dir, vision_dir = folder / "base_lm", folder / "base_vision"
    lm.save_pretrained(lm_dir)
    tokenizer.save_pretrained(lm_dir)
    ResNetModel(tiny_resnet_config()).save_pretrained(vision_dir)
    ConvNextImageProcessor(size={"shortest_edge": image_size}).save_pretrained(vision_dir)
    return str(lm_dir), str(vision_dir)


def save_tiny_softprompt(recipe: SoftPromptRecipe, work_dir: Path, texts: Iterable[str]) -> str:
    """The tiny start folder, in the saved-model layout (base LM kept inside it); returns the folder."""
    out = work_dir / "tiny-init"
    lm_dir, vision_dir = save_tiny_parts(out, texts, recipe.spec.data.image_size)
    sources = Sources(lm_dir, vision_dir, lm_dir, None)
    write_softprompt(recipe.build(sources, trainable=True, lm_lora=recipe.spec.model.lm_lora), sources, out)
    return str(out)


def save_random_softprompt(recipe: SoftPromptRecipe, work_dir: Path, texts: Iterable[str]) -> str:
    """``model.preset: random``: the published architectures of ``model.name_or_path`` (the LM) and
    ``model.vision_name_or_path`` (the ResNet) with random weights in ``model.dtype``, a tokenizer trained on
    ``texts``, saved in the saved-model layout; returns the folder. The LM is written once: as the base of a
    fresh adapter (``base_lm/``) with LoRA, as the trained LM's folder (``lm/``) without."""
    spec = recipe.spec
    out = work_dir / "random-init"
    tokenizer = random_tokenizer(texts)
    lm_config = real_config(spec.model.name_or_path)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    lm_config.bos_token_id, lm_config.eos_token_id, lm_config.pad_token_id = bos, eos, pad
    vision_config = real_config(spec.model.vision_name_or_path)
    if not isinstance(vision_config, ResNetConfig):
        raise ValueError(f"model.vision_name_or_path: the softprompt_llm recipe needs a ResNet architecture, "
                         f"got {spec.model.vision_name_or_path!r}")
    dtype = storage_dtype(spec)
    lm = build_random(AutoModelForCausalLM, lm_config, dtype, seed=spec.train.seed)
    vision = build_random(ResNetModel, vision_config, dtype, seed=spec.train.seed)
    vision_dir = out / "base_vision"
    vision.save_pretrained(vision_dir)
    ConvNextImageProcessor(size={"shortest_edge": spec.data.image_size}).save_pretrained(vision_dir)
    base_lm = out / ("base_lm" if spec.model.lm_lora else LM_DIR)
    if spec.model.lm_lora:
        lm.save_pretrained(base_lm)
    tokenizer.save_pretrained(base_lm)
    model = assemble_softprompt(vision, lm, spec.model, str(base_lm), spec.train.seed, fresh_lora=spec.model.lm_lora)
    model.mapper.to(dtype)
    write_softprompt(model, Sources(str(base_lm), str(vision_dir), str(base_lm), None), out)
    release(model)
    return str(out)
