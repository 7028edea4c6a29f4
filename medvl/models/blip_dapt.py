"""Domain-adaptive pretraining (DAPT) of BLIP on image–text pairs, with optional EMA self-distillation.

BLIP's three pretraining objectives on one shared vision encoder:

* **ITC**: image–text contrastive. Unimodal [CLS] features of the ViT and of the text encoder (no
  cross-attention) are projected and L2-normalised; a symmetric InfoNCE over the batch with a learned
  temperature (``logit_scale``, CLIP-style, clamped at 100). Rows of the same ``group_id`` (the same image, or
  the same study) count as positives of each other, with the target mass split between them.
* **ITM**: image–text matching. The text encoder with cross-attention to the image patches, a binary head on
  [CLS]. Each image gets a hard negative text and each text a hard negative image, drawn with probability
  softmax(ITC similarity) among the non-positives (the most similar one in eval mode, so validation losses
  are deterministic).
* **LM**: captioning loss of the text decoder cross-attending to the image.

The training module (:class:`BlipDaptModel`) holds a :class:`DaptNet` student (a ``BlipForQuestionAnswering``
— ViT, text encoder, text decoder — plus the ITC projections, the ITM head and the temperature) and, with
``model.distill``, a frozen EMA copy of it as teacher (see :mod:`medvl.models.distill`).

Why ``BlipForQuestionAnswering`` as the container: it is exactly the three towers the VQA stage needs, so the
export loads there with no key renaming and no missing weights.

Save layout (one folder; the VQA stage reads it with ``BlipForQuestionAnswering.from_pretrained``)::

    config.json, model.safetensors     BlipForQuestionAnswering: vision_model, text_encoder, text_decoder
    dapt_heads.safetensors             vision_proj, text_proj, itm_head, logit_scale, ratio_ema (DAPT only)
    ema_teacher.safetensors            the EMA teacher (a DaptNet state dict), with model.distill only
    tokenizer files, preprocessor_config.json

Starting points: a hub id or folder holding a BLIP VQA checkpoint (``Salesforce/blip-vqa-base`` carries all
three towers; its ITC projections and ITM head are not released with it, so they start fresh: they are
small and learn fast), a tiny-init folder, or a folder this recipe saved (heads and teacher are restored).
A captioning checkpoint (``blip-image-captioning-base``) also loads, but its text encoder then starts random.

Captions come from the ``text`` column. Rows with no text (VQA-RAD has no captions) fall back to the
question and its answer as a pseudo-caption ("is there a fracture? no"): image-grounded text, but far weaker
than real captions; point the stage at ROCO shards for real DAPT (see jobs/vqarad_blip_dapt.yaml).
"""
from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from transformers import AutoTokenizer, BlipForQuestionAnswering

from medvl.models.base import Batch, GenerationSettings, LoadedModel, Recipe, TensorBatch
from medvl.models.blip_common import (
    BlipPreprocessor,
    apply_frozen_vision_policy,
    blip_attention_maps,
    encode_texts,
    lm_labels,
    save_blip_folder,
    save_random_blip,
    save_tiny_blip,
)
from medvl.models.checkpointing import enable_hf_checkpointing, run_checkpointed
from medvl.models.distill import (
    distilled_total,
    ema_momentum,
    ema_update,
    smooth_ratios,
    task_weights,
)
from medvl.models.precision import weight_dtype
from medvl.models.scored_generation import Generated, generate_scored

TASKS = ("itc", "itm", "lm")
HEADS_FILE = "dapt_heads.safetensors"
TEACHER_FILE = "ema_teacher.safetensors"
MAX_LOGIT_SCALE = math.log(100.0)
DAPT_COLUMNS = ("pixel_values", "input_ids", "attention_mask", "text_input_ids", "text_attention_mask", "group_index")

Negatives = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------------------------- losses


def contrastive_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of image×text ``logits``; each row's target mass is spread over its positives."""
    logits = logits.float()
    image_targets = positives.float() / positives.sum(1, keepdim=True)
    text_targets = positives.T.float() / positives.T.sum(1, keepdim=True)
    image_to_text = -(F.log_softmax(logits, dim=1) * image_targets).sum(1).mean()
    text_to_image = -(F.log_softmax(logits.T, dim=1) * text_targets).sum(1).mean()
    return (image_to_text + text_to_image) / 2


def _pick_negatives(similarity: torch.Tensor, positives: torch.Tensor, sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchors that have a negative, the chosen negative of each): softmax-sampled or the hardest."""
    anchors = (~positives).any(dim=1).nonzero().squeeze(1)
    if anchors.numel() == 0:
        return anchors, anchors
    scores = similarity[anchors].float().masked_fill(positives[anchors], float("-inf"))
    chosen = torch.multinomial(torch.softmax(scores, dim=1), 1).squeeze(1) if sample else scores.argmax(dim=1)
    return anchors, chosen


@torch.no_grad()
def hard_negatives(logits: torch.Tensor, positives: torch.Tensor, sample: bool = True) -> Negatives:
    """(images, their negative texts, texts, their negative images) mined from the ITC similarities."""
    images, negative_texts = _pick_negatives(logits, positives, sample)
    texts, negative_images = _pick_negatives(logits.T, positives.T, sample)
    return images, negative_texts, texts, negative_images


# --------------------------------------------------------------------------------------------- modules


class DaptNet(nn.Module):
    """One BLIP (ViT + text encoder + text decoder) with the ITC projections, ITM head and temperature."""

    def __init__(self, blip: BlipForQuestionAnswering):
        super().__init__()
        config = blip.config
        self.blip = blip
        self.vision_proj = nn.Linear(config.vision_config.hidden_size, config.image_text_hidden_size)
        self.text_proj = nn.Linear(config.text_config.hidden_size, config.image_text_hidden_size)
        self.itm_head = nn.Linear(config.text_config.hidden_size, 2)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        self.checkpoint_heads = False

    def enable_gradient_checkpointing(self) -> None:
        """BLIP's towers checkpoint their layers themselves; the heads (no HF support) go through torch's."""
        enable_hf_checkpointing(self.blip)
        self.checkpoint_heads = True

    def head(self, module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return run_checkpointed(module, inputs, enabled=self.checkpoint_heads)

    def task_losses(self, batch: TensorBatch, negatives: Negatives | None = None) -> tuple[torch.Tensor, Negatives]:
        """The stacked (ITC, ITM, LM) losses, and the ITM negatives used (mined here unless given)."""
        image_embeds = self.blip.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text_ids, text_mask = batch["text_input_ids"], batch["text_attention_mask"]

        text_embeds = self.blip.text_encoder(input_ids=text_ids, attention_mask=text_mask).last_hidden_state
        image_feat = F.normalize(self.head(self.vision_proj, image_embeds[:, 0]), dim=-1)
        text_feat = F.normalize(self.head(self.text_proj, text_embeds[:, 0]), dim=-1)
        logits = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp() * image_feat @ text_feat.T
        groups = batch["group_index"]
        positives = groups[:, None] == groups[None, :]
        loss_itc = contrastive_loss(logits, positives)

        if negatives is None:
            negatives = hard_negatives(logits.detach(), positives, sample=self.training)
        loss_itm = self._matching_loss(image_embeds, image_mask, text_ids, text_mask, negatives)

        loss_lm = self.blip.text_decoder(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            labels=lm_labels(batch["input_ids"], batch["attention_mask"]),
        ).loss
        return torch.stack([loss_itc, loss_itm.to(loss_itc.dtype), loss_lm.to(loss_itc.dtype)]), negatives

    def _matching_loss(self, image_embeds, image_mask, text_ids, text_mask, negatives: Negatives) -> torch.Tensor:
        images_a, texts_a, texts_b, images_b = negatives
        every = torch.arange(text_ids.shape[0], device=text_ids.device)
        image_index = torch.cat([every, images_a, images_b])
        text_index = torch.cat([every, texts_a, texts_b])
        fused = self.blip.text_encoder(
            input_ids=text_ids[text_index],
            attention_mask=text_mask[text_index],
            encoder_hidden_states=image_embeds[image_index],
            encoder_attention_mask=image_mask[image_index],
        ).last_hidden_state
        labels = (torch.arange(len(image_index), device=text_ids.device) < len(every)).long()  # 1 = matched
        return F.cross_entropy(self.head(self.itm_head, fused[:, 0]).float(), labels)

    def heads_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("blip.")}


class BlipDaptModel(nn.Module):
    """The student :class:`DaptNet`, and with distillation its frozen EMA teacher.

    ``forward`` takes the preprocessed batch and returns a dict with ``loss`` (what the optimiser minimises)
    and the per-task scalars. The teacher is a registered submodule (it moves to the device with the model)
    whose parameters never require grad, so the training loop's optimizer and DDP leave it alone; it stays in
    eval mode whatever ``train()`` is called with. ``ratio_ema`` holds the smoothed student/teacher loss
    ratios behind the task weights (updated in training mode only).
    """

    def __init__(self, student: DaptNet, distill: bool = False):
        super().__init__()
        self.student = student
        self.teacher: DaptNet | None = None
        self.register_buffer("ratio_ema", torch.ones(len(TASKS)))
        if distill:
            self.teacher = copy.deepcopy(student).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> BlipDaptModel:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def enable_gradient_checkpointing(self) -> None:
        """The student's (the teacher runs without a graph: nothing of it is kept for backward)."""
        self.student.enable_gradient_checkpointing()

    def forward(self, **batch: torch.Tensor) -> dict[str, torch.Tensor]:
        student, negatives = self.student.task_losses(batch)
        out = {f"loss_{task}": student[i] for i, task in enumerate(TASKS)}
        if self.teacher is None:
            out["loss"] = student.sum()
            return out
        with torch.no_grad():
            teacher, _ = self.teacher.task_losses(batch, negatives)  # same negatives: the losses compare
        if self.training:
            self.ratio_ema.copy_(smooth_ratios(self.ratio_ema, student, teacher))
        weights = task_weights(self.ratio_ema)
        out["loss"] = distilled_total(student, teacher, weights)
        out |= {f"teacher_{task}": teacher[i] for i, task in enumerate(TASKS)}
        out |= {f"weight_{task}": weights[i] for i, task in enumerate(TASKS)}
        return out


# --------------------------------------------------------------------------------------------- loading, saving


def _local_file(source: str, name: str) -> Path | None:
    path = Path(source) / name
    return path if path.is_file() else None


def load_dapt_model(source: str, distill: bool, dtype: torch.dtype = torch.float32) -> BlipDaptModel:
    """The DAPT model from any starting point the module docstring lists, in ``dtype``."""
    student = DaptNet(BlipForQuestionAnswering.from_pretrained(source, dtype=dtype)).to(dtype)  # heads too
    heads = _local_file(source, HEADS_FILE)
    ratio_ema = None
    if heads:
        state = load_file(heads)
        ratio_ema = state.pop("ratio_ema", None)
        _load_strict(student, state, heads, prefix_ok="blip.")
    model = BlipDaptModel(student, distill=distill)
    if ratio_ema is not None:
        model.ratio_ema.copy_(ratio_ema)
    teacher = _local_file(source, TEACHER_FILE)
    if distill and teacher:
        load_model(model.teacher, teacher)
    return model


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], path: Path, prefix_ok: str) -> None:
    """Load a partial state dict: every key must exist; missing keys are allowed only under ``prefix_ok``."""
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(prefix_ok)]
    if result.unexpected_keys or missing:
        raise RuntimeError(f"{path} does not match the model: unexpected {result.unexpected_keys[:5]}, "
                           f"missing {missing[:5]}")


def save_dapt_model(model: BlipDaptModel, model_source: str, out_dir: Path) -> None:
    """Write the layout of the module docstring: a BLIP VQA folder plus the DAPT heads (and teacher)."""
    save_blip_folder(model.student.blip, model_source, out_dir)
    save_file({**model.student.heads_state(), "ratio_ema": model.ratio_ema}, out_dir / HEADS_FILE)
    if model.teacher is not None:
        save_model(model.teacher, str(out_dir / TEACHER_FILE))  # handles the decoder's tied embeddings


# --------------------------------------------------------------------------------------------- data


def caption_of(text: str, question: str, answer: str) -> str:
    """The row's caption, or its question and answer as a pseudo-caption when it has none."""
    text = str(text).strip()
    return text if text else f"{str(question).strip()} {str(answer).strip()}".strip()


def group_index(group_id: str) -> int:
    """A stable 63-bit integer for a group id (batches carry tensors, not strings)."""
    return int.from_bytes(hashlib.blake2b(str(group_id).encode(), digest_size=8).digest(), "big") >> 1


class DaptPreprocessor(BlipPreprocessor):
    """Caption as decoder input (``input_ids``: ``[bos] … [sep]``) and as encoder input (``text_input_ids``:
    ``[cls] … [sep]``), plus ``group_index`` to tell in-batch positives from negatives."""

    def __call__(self, batch: Batch) -> Batch:
        captions = [caption_of(*row) for row in zip(batch["text"], batch["question"], batch["answer"])]
        groups = {str(i): group_index(g) for i, g in zip(batch["id"], batch["group_id"])}
        out = super().__call__({**batch, "text": np.asarray(captions, dtype=object)})
        out["text_input_ids"], out["text_attention_mask"] = encode_texts(
            self.tokenizer, [str(t) for t in out["text"]], self.max_text_length,
            self.cls, self.sep, self.pad,
        )
        out["group_index"] = np.asarray([groups[str(i)] for i in out["id"]], dtype=np.int64)
        return out


# --------------------------------------------------------------------------------------------- recipe


class BlipDaptRecipe(Recipe):
    tensor_columns = DAPT_COLUMNS

    def initial_model(self, work_dir: Path, train_texts: Callable[[], Iterable[str]]) -> str:
        if self.spec.model.preset == "tiny":
            return save_tiny_blip(BlipForQuestionAnswering, work_dir, train_texts(), self.spec.data.image_size)
        if self.spec.model.preset == "random":
            return save_random_blip(BlipForQuestionAnswering, self.spec, work_dir, train_texts())
        return self.spec.model.name_or_path

    def preprocessor(self, model_source: str) -> Callable[[Batch], Batch]:
        data = self.spec.data
        return DaptPreprocessor(model_source, data.image_size, data.max_text_length, data.max_question_length)

    def load_for_training(self, model_source: str) -> torch.nn.Module:
        model = load_dapt_model(model_source, distill=self.spec.model.distill, dtype=weight_dtype(self.spec))
        apply_frozen_vision_policy(model.student, self.spec.train.finetune, vision_prefix="blip.vision_model.")
        return model

    def load_for_inference(self, model_dir: str) -> LoadedModel:
        return LoadedModel(load_dapt_model(model_dir, distill=False, dtype=weight_dtype(self.spec)).eval(),
                           AutoTokenizer.from_pretrained(model_dir))

    def loss(self, model: torch.nn.Module, batch: TensorBatch) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(**{name: batch[name] for name in DAPT_COLUMNS})
        return out["loss"], {k: v.item() for k, v in out.items() if k != "loss"}

    def after_optimizer_step(self, model: torch.nn.Module, step: int, total_steps: int) -> None:
        if model.teacher is not None:
            settings = self.spec.model
            tau = ema_momentum(step, total_steps, settings.ema_tau_start, settings.ema_tau_end)
            ema_update(model.teacher, model.student, tau)

    @torch.no_grad()
    def generate_scored(self, loaded: LoadedModel, batch: TensorBatch, settings: GenerationSettings) -> Generated:
        """Captions from the decoder (as BlipForConditionalGeneration would write them)."""
        blip = loaded.module.student.blip
        image_embeds = blip.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = blip.config.text_config
        bos = torch.full((image_embeds.shape[0], 1), text.bos_token_id, dtype=torch.long, device=image_embeds.device)
        return generate_scored(
            blip.text_decoder.generate, blip.text_decoder, loaded.tokenizer, text.sep_token_id,
            input_ids=bos, eos_token_id=text.sep_token_id, pad_token_id=text.pad_token_id,
            encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask,
            num_beams=settings.num_beams, max_new_tokens=settings.max_new_tokens,
        )

    def attention_maps(self, loaded: LoadedModel, batch: TensorBatch, texts: list[str]) -> np.ndarray:
        return blip_attention_maps(loaded.module.student.blip, loaded.tokenizer, batch["pixel_values"], texts,
                                   self.spec.data.max_text_length)

    def save(self, model: torch.nn.Module, model_source: str, out_dir: Path) -> None:
        save_dapt_model(model, model_source, out_dir)

    def restore(self, model: torch.nn.Module, checkpoint_dir: Path) -> None:
        """Resume: the student's towers, its heads and temperature, the ratio EMA and the teacher."""
        # Read in fp32, as saved: the live model decides each weight's dtype (trainable ones are fp32 under DDP).
        restored = load_dapt_model(str(checkpoint_dir), distill=model.teacher is not None)
        model.load_state_dict(restored.state_dict())
