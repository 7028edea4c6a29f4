"""Domain-adaptive pretraining (DAPT) of BLIP on image–text pairs, with optional EMA self-distillation.

BLIP's three pretraining objectives on one shared vision encoder:

* **ITC**: image–text contrastive. Unimodal [CLS] features of the ViT and of the text encoder (no
  cross-attention) are projected and L2-normalised; a symmetric InfoNCE with a learned temperature
  (``logit_scale``, CLIP-style, clamped at 100). Rows of the same ``group_id`` (the same image, or the same
  study) count as positives of each other, with the target mass split between them. With
  ``model.itc_queue_size: N`` (BLIP's own ITC; the write-up used 256) each image is contrasted with the
  *momentum* text features of the batch and of the last N batches' texts, and each text likewise with momentum
  image features: momentum encoders (a ViT, a text encoder and the two projections, updated after every
  optimizer step as θ_m ← 0.995·θ_m + 0.005·θ) write their features into a queue (:class:`ItcMomentum`), so the
  negatives outnumber the batch without their gradients. Queued features of the same group are positives too.
  BLIP's soft ITC targets from the momentum model (its α) are not used: ``model.distill`` plays that part.
  Validation contrasts in-batch only, so a queue that fills up over training does not move the validation loss.
* **ITM**: image–text matching. The text encoder with cross-attention to the image patches, a binary head on
  [CLS]. Each image gets a hard negative text and each text a hard negative image, drawn with probability
  softmax(ITC similarity) among the non-positives of the batch (the most similar one in eval mode, so
  validation losses are deterministic).
* **LM**: captioning loss of the text decoder cross-attending to the image.

The training module (:class:`BlipDaptModel`) holds a :class:`DaptNet` student (a ``BlipForQuestionAnswering``
— ViT, text encoder, text decoder — plus the ITC projections, the ITM head and the temperature), with
``model.distill`` a frozen EMA copy of it as teacher (see :mod:`medvl.models.distill`), and with a queue the
momentum encoders. Its loss is Σ_k L_k + Σ_k w_k·MSE_k: the three task losses, plus per task the mean squared
difference between the student's and the teacher's outputs (ITC similarities, ITM logits, LM logits) weighted by
the adaptive weights w_k.

The ViT runs at ``data.image_size`` whatever resolution the checkpoint was trained at: its position embeddings
are interpolated when they differ (BLIP pretrains at 224 px and fine-tunes VQA at 384; the DAPT write-up ran at 224).

Why ``BlipForQuestionAnswering`` as the container: it is exactly the three towers the VQA stage needs, so the
export loads there with no key renaming and no missing weights.

Save layout (one folder; the VQA stage reads it with ``BlipForQuestionAnswering.from_pretrained``)::

    config.json, model.safetensors     BlipForQuestionAnswering: vision_model, text_encoder, text_decoder
    dapt_heads.safetensors             vision_proj, text_proj, itm_head, logit_scale, ratio_ema (DAPT only)
    ema_teacher.safetensors            the EMA teacher (a DaptNet state dict), with model.distill only
    itc_momentum.safetensors           momentum encoders and the feature queue, with model.itc_queue_size only
    tokenizer files, preprocessor_config.json

Starting points: a hub id or folder holding a BLIP VQA checkpoint (``Salesforce/blip-vqa-base`` carries all
three towers; its ITC projections and ITM head are not released with it, so they start fresh: they are
small and learn fast), a tiny-init folder, or a folder this recipe saved (heads, teacher and momentum encoders
are restored; a queue of another size starts afresh from the student).
A captioning checkpoint (``blip-image-captioning-base``) also loads, but its text encoder then starts random.

Captions come from the ``text`` column. Rows with no text (VQA-RAD has no captions) fall back to the
question and its answer as a pseudo-caption ("is there a fracture? no"): image-grounded text, but far weaker
than real captions; jobs/vqarad_blip_dapt.yaml runs DAPT on ROCOv2's CT, MRI and X-ray captions and keeps the
pseudo-captions as the documented fallback without ROCOv2.
"""
from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from transformers import AutoTokenizer, BlipForQuestionAnswering

from medvl.models.base import Batch, GenerationSettings, LoadedModel, Recipe, TensorBatch, shifted_targets
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
    distillation_mses,
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
MOMENTUM_FILE = "itc_momentum.safetensors"
ITC_MOMENTUM = 0.995  # BLIP's momentum-encoder coefficient
MAX_LOGIT_SCALE = math.log(100.0)
DAPT_COLUMNS = ("pixel_values", "input_ids", "attention_mask", "text_input_ids", "text_attention_mask", "group_index")

Negatives = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------------------------- losses


def one_way_contrastive(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """InfoNCE of each row of ``logits`` against its columns; a row's target mass is spread over its positives."""
    targets = positives.float() / positives.sum(1, keepdim=True)
    return -(F.log_softmax(logits.float(), dim=1) * targets).sum(1).mean()


def contrastive_loss(logits: torch.Tensor, positives: torch.Tensor,
                     text_logits: torch.Tensor | None = None, text_positives: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """Symmetric InfoNCE: images against texts (``logits``) and texts against images (``text_logits``; by
    default ``logits.T``, the in-batch case; with a queue, text features against the momentum image features)."""
    if text_logits is None:
        text_logits, text_positives = logits.T, positives.T
    return (one_way_contrastive(logits, positives) + one_way_contrastive(text_logits, text_positives)) / 2


def _pick_negatives(similarity: torch.Tensor, positives: torch.Tensor, sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchors that have a negative, the chosen negative of each): softmax-sampled or the hardest."""
    anchors = (~positives).any(dim=1).nonzero().squeeze(1)
    if anchors.numel() == 0:
        return anchors, anchors
    scores = similarity[anchors].float().masked_fill(positives[anchors], float("-inf"))
    chosen = torch.multinomial(torch.softmax(scores, dim=1), 1).squeeze(1) if sample else scores.argmax(dim=1)
    return anchors, chosen


@torch.no_grad()
def hard_negatives(logits: torch.Tensor, positives: torch.Tensor, sample: bool = True,
                   text_logits: torch.Tensor | None = None) -> Negatives:
    """(images, their negative texts, texts, their negative images) mined from the in-batch ITC similarities
    (``text_logits``: the texts' own similarities to the batch's images, default ``logits.T``)."""
    images, negative_texts = _pick_negatives(logits, positives, sample)
    text_logits = logits.T if text_logits is None else text_logits
    texts, negative_images = _pick_negatives(text_logits, positives.T, sample)
    return images, negative_texts, texts, negative_images


# --------------------------------------------------------------------------------------------- modules


def vision_states(vision_model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The ViT's last hidden states at any input size (position embeddings interpolated off the config's size)."""
    resized = pixel_values.shape[-1] != vision_model.config.image_size
    return vision_model(pixel_values=pixel_values, interpolate_pos_encoding=resized).last_hidden_state


@dataclass
class ItcKeys:
    """What a batch's ITC contrasts with under a queue: momentum features of the batch itself (the first
    ``batch`` rows, in batch order), then the queued ones, with the group of each."""

    images: torch.Tensor  # (batch + queued, dim), L2-normalised
    texts: torch.Tensor
    groups: torch.Tensor  # (batch + queued,)
    batch: int


@dataclass
class TaskResult:
    """One network's pass over a batch: the stacked (ITC, ITM, LM) losses, the outputs the distillation terms
    compare (per task), and the ITM negatives it used."""

    losses: torch.Tensor
    outputs: dict[str, torch.Tensor]
    negatives: Negatives


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

    def task_losses(self, batch: TensorBatch, negatives: Negatives | None = None,
                    keys: ItcKeys | None = None) -> TaskResult:
        """The three losses, the outputs behind them and the ITM negatives (mined here unless given). ITC
        contrasts in-batch, or with ``keys`` (momentum features of the batch and the queue) when given."""
        image_embeds = vision_states(self.blip.vision_model, batch["pixel_values"])
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text_ids, text_mask = batch["text_input_ids"], batch["text_attention_mask"]

        text_embeds = self.blip.text_encoder(input_ids=text_ids, attention_mask=text_mask).last_hidden_state
        image_feat = F.normalize(self.head(self.vision_proj, image_embeds[:, 0]), dim=-1)
        text_feat = F.normalize(self.head(self.text_proj, text_embeds[:, 0]), dim=-1)
        scale = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        groups = batch["group_index"]
        if keys is None:
            image_to_text = image_feat @ text_feat.T
            text_to_image = image_to_text.T
            positives = groups[:, None] == groups[None, :]
        else:
            image_to_text = image_feat @ keys.texts.to(image_feat.dtype).T
            text_to_image = text_feat @ keys.images.to(text_feat.dtype).T
            positives = groups[:, None] == keys.groups[None, :]
        loss_itc = contrastive_loss(scale * image_to_text, positives, scale * text_to_image, positives)

        if negatives is None:
            in_batch = len(groups)
            negatives = hard_negatives((scale * image_to_text[:, :in_batch]).detach(), positives[:, :in_batch],
                                       sample=self.training, text_logits=(scale * text_to_image[:, :in_batch]).detach())
        loss_itm, itm_logits = self._matching_loss(image_embeds, image_mask, text_ids, text_mask, negatives)

        decoded = self.blip.text_decoder(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            labels=lm_labels(batch["input_ids"], batch["attention_mask"]),
        )
        outputs = {
            "itc": torch.cat([image_to_text, text_to_image], dim=1),  # cosine similarities, before the temperature
            "itm": itm_logits,
            "lm": decoded.logits[batch["attention_mask"].bool()],  # the logits at real (not padding) positions
        }
        losses = torch.stack([loss_itc, loss_itm.to(loss_itc.dtype), decoded.loss.to(loss_itc.dtype)])
        return TaskResult(losses, outputs, negatives)

    def _matching_loss(self, image_embeds, image_mask, text_ids, text_mask, negatives: Negatives
                       ) -> tuple[torch.Tensor, torch.Tensor]:
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
        logits = self.head(self.itm_head, fused[:, 0]).float()
        return F.cross_entropy(logits, labels), logits

    def heads_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("blip.")}


class ItcMomentum(nn.Module):
    """BLIP's momentum encoders for ITC and the queue of their features (``model.itc_queue_size`` rows).

    Copies of the student's ViT, text encoder and ITC projections that never train: after each optimizer step
    they move towards the student (:meth:`update`). Their features of each training batch are ITC's keys
    (:meth:`keys`) and then join the queue (:meth:`enqueue`), a ring buffer that, under several workers, holds
    every worker's batch. The queue and its write position are buffers, so checkpoints resume it.
    """

    def __init__(self, student: DaptNet, queue_size: int):
        super().__init__()
        self.vision_model = copy.deepcopy(student.blip.vision_model)
        self.text_encoder = copy.deepcopy(student.blip.text_encoder)
        self.vision_proj = copy.deepcopy(student.vision_proj)
        self.text_proj = copy.deepcopy(student.text_proj)
        self.requires_grad_(False)
        dim, dtype = student.vision_proj.out_features, student.vision_proj.weight.dtype
        self.register_buffer("image_queue", torch.zeros(queue_size, dim, dtype=dtype))
        self.register_buffer("text_queue", torch.zeros(queue_size, dim, dtype=dtype))
        self.register_buffer("group_queue", torch.zeros(queue_size, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # the next row to write
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))  # rows holding features

    @property
    def queue_size(self) -> int:
        return self.image_queue.shape[0]

    def train(self, mode: bool = True) -> ItcMomentum:
        return super().train(False)  # dropout off: the keys are targets, not samples

    def pairs(self, student: DaptNet) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.vision_model, student.blip.vision_model), (self.text_encoder, student.blip.text_encoder),
                (self.vision_proj, student.vision_proj), (self.text_proj, student.text_proj)]

    @torch.no_grad()
    def update(self, student: DaptNet, momentum: float = ITC_MOMENTUM) -> None:
        """θ_m ← m·θ_m + (1 − m)·θ_student, module by module."""
        for mine, theirs in self.pairs(student):
            for m, s in zip(mine.parameters(), theirs.parameters(), strict=True):
                m.mul_(momentum).add_(s.detach().to(m.dtype), alpha=1.0 - momentum)

    @torch.no_grad()
    def keys(self, batch: TensorBatch) -> ItcKeys:
        """Momentum features of the batch, then the queued ones (a copy: the queue changes after this step)."""
        image_embeds = vision_states(self.vision_model, batch["pixel_values"])
        text_embeds = self.text_encoder(input_ids=batch["text_input_ids"],
                                        attention_mask=batch["text_attention_mask"]).last_hidden_state
        images = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)
        texts = F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)
        filled = int(self.queue_filled)
        return ItcKeys(torch.cat([images, self.image_queue[:filled].to(images.dtype)]),
                       torch.cat([texts, self.text_queue[:filled].to(texts.dtype)]),
                       torch.cat([batch["group_index"], self.group_queue[:filled]]), batch=len(images))

    @torch.no_grad()
    def enqueue(self, keys: ItcKeys) -> None:
        """Write the batch's momentum features (every worker's) over the oldest rows."""
        images, texts, groups = (_gathered(t[: keys.batch]) for t in (keys.images, keys.texts, keys.groups))
        images, texts, groups = images[-self.queue_size:], texts[-self.queue_size:], groups[-self.queue_size:]
        rows = (int(self.queue_ptr) + torch.arange(len(groups), device=groups.device)) % self.queue_size
        self.image_queue[rows] = images.to(self.image_queue.dtype)
        self.text_queue[rows] = texts.to(self.text_queue.dtype)
        self.group_queue[rows] = groups
        self.queue_ptr.fill_((int(self.queue_ptr) + len(groups)) % self.queue_size)
        self.queue_filled.fill_(min(self.queue_size, int(self.queue_filled) + len(groups)))


def _gathered(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` from every worker, concatenated in rank order (itself alone outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class BlipDaptModel(nn.Module):
    """The student :class:`DaptNet`, with distillation its frozen EMA teacher, with a queue its momentum encoders.

    ``forward`` takes the preprocessed batch and returns a dict with ``loss`` (what the optimiser minimises)
    and the per-task scalars. The teacher and the momentum encoders are registered submodules (they move to the
    device with the model) whose parameters never require grad, so the training loop's optimizer and DDP leave
    them alone; they stay in eval mode whatever ``train()`` is called with. ``ratio_ema`` holds the smoothed
    student/teacher loss ratios behind the distillation weights (updated in training mode only).
    """

    def __init__(self, student: DaptNet, distill: bool = False, itc_queue_size: int = 0):
        super().__init__()
        self.student = student
        self.teacher: DaptNet | None = None
        self.momentum: ItcMomentum | None = ItcMomentum(student, itc_queue_size) if itc_queue_size else None
        self.register_buffer("ratio_ema", torch.ones(len(TASKS)))
        if distill:
            self.teacher = copy.deepcopy(student).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> BlipDaptModel:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def enable_gradient_checkpointing(self) -> None:
        """The student's (the teacher and the momentum encoders run without a graph)."""
        self.student.enable_gradient_checkpointing()

    def forward(self, **batch: torch.Tensor) -> dict[str, torch.Tensor]:
        keys = self.momentum.keys(batch) if self.momentum is not None and self.training else None
        student = self.student.task_losses(batch, keys=keys)
        out = {f"loss_{task}": student.losses[i] for i, task in enumerate(TASKS)}
        out["loss"] = student.losses.sum()
        if self.teacher is not None:
            with torch.no_grad():  # same negatives and keys: the losses and outputs compare
                teacher = self.teacher.task_losses(batch, student.negatives, keys)
            if self.training:
                self.ratio_ema.copy_(smooth_ratios(self.ratio_ema, student.losses, teacher.losses))
            weights = task_weights(self.ratio_ema)
            mses = distillation_mses(student.outputs, teacher.outputs, TASKS)
            out["loss"] = distilled_total(student.losses, mses, weights)
            out |= {f"teacher_{task}": teacher.losses[i] for i, task in enumerate(TASKS)}
            out |= {f"mse_{task}": mses[i] for i, task in enumerate(TASKS)}
            out |= {f"weight_{task}": weights[i] for i, task in enumerate(TASKS)}
        if keys is not None:
            self.momentum.enqueue(keys)
        return out


# --------------------------------------------------------------------------------------------- loading, saving


def _local_file(source: str, name: str) -> Path | None:
    path = Path(source) / name
    return path if path.is_file() else None


def load_dapt_model(source: str, distill: bool, dtype: torch.dtype = torch.float32,
                    itc_queue_size: int = 0) -> BlipDaptModel:
    """The DAPT model from any starting point the module docstring lists, in ``dtype``."""
    student = DaptNet(BlipForQuestionAnswering.from_pretrained(source, dtype=dtype)).to(dtype)  # heads too
    heads = _local_file(source, HEADS_FILE)
    ratio_ema = None
    if heads:
        state = load_file(heads)
        ratio_ema = state.pop("ratio_ema", None)
        _load_strict(student, state, heads, prefix_ok="blip.")
    model = BlipDaptModel(student, distill=distill, itc_queue_size=itc_queue_size)
    if ratio_ema is not None:
        model.ratio_ema.copy_(ratio_ema)
    teacher = _local_file(source, TEACHER_FILE)
    if distill and teacher:
        load_model(model.teacher, teacher)
    momentum = _local_file(source, MOMENTUM_FILE)
    if model.momentum is not None and momentum and _queue_rows(momentum) == itc_queue_size:
        load_model(model.momentum, momentum)
    return model


def _queue_rows(path: Path) -> int:
    with safe_open(str(path), "pt") as saved:
        return saved.get_slice("image_queue").get_shape()[0]


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
    if model.momentum is not None:
        save_model(model.momentum, str(out_dir / MOMENTUM_FILE))


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
        settings = self.spec.model
        model = load_dapt_model(model_source, distill=settings.distill, dtype=weight_dtype(self.spec),
                                itc_queue_size=settings.itc_queue_size)
        apply_frozen_vision_policy(model.student, self.spec.train.finetune, vision_prefix="blip.vision_model.")
        return model

    def load_for_inference(self, model_dir: str) -> LoadedModel:
        return LoadedModel(load_dapt_model(model_dir, distill=False, dtype=weight_dtype(self.spec)).eval(),
                           AutoTokenizer.from_pretrained(model_dir))

    def loss(self, model: torch.nn.Module, batch: TensorBatch) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(**{name: batch[name] for name in DAPT_COLUMNS})
        return out["loss"], {k: v.item() for k, v in out.items() if k != "loss"}

    def after_optimizer_step(self, model: torch.nn.Module, step: int, total_steps: int) -> None:
        if model.momentum is not None:
            model.momentum.update(model.student)
        if model.teacher is not None:
            settings = self.spec.model
            tau = ema_momentum(step, total_steps, settings.ema_tau_start, settings.ema_tau_end)
            ema_update(model.teacher, model.student, tau)

    @torch.no_grad()
    def generate_scored(self, loaded: LoadedModel, batch: TensorBatch, settings: GenerationSettings) -> Generated:
        """Captions from the decoder (as BlipForConditionalGeneration would write them)."""
        blip = loaded.module.student.blip
        image_embeds = vision_states(blip.vision_model, batch["pixel_values"])
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = blip.config.text_config
        bos = torch.full((image_embeds.shape[0], 1), text.bos_token_id, dtype=torch.long, device=image_embeds.device)
        return generate_scored(
            blip.text_decoder.generate, blip.text_decoder, loaded.tokenizer, text.sep_token_id,
            input_ids=bos, eos_token_id=text.sep_token_id, pad_token_id=text.pad_token_id,
            encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask,
            num_beams=settings.num_beams, max_new_tokens=settings.max_new_tokens,
            confidence_temperature=settings.confidence_temperature,
        )

    def target_logits(self, model: torch.nn.Module, batch: TensorBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The captioning (LM) task's decoder logits at the caption tokens its loss scores."""
        blip = model.student.blip
        image_embeds = vision_states(blip.vision_model, batch["pixel_values"])
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        logits = blip.text_decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask).logits
        return shifted_targets(logits, lm_labels(batch["input_ids"], batch["attention_mask"]))

    def attention_maps(self, loaded: LoadedModel, batch: TensorBatch, texts: list[str]) -> np.ndarray:
        return blip_attention_maps(loaded.module.student.blip, loaded.tokenizer, batch["pixel_values"], texts,
                                   self.spec.data.max_text_length)

    def save(self, model: torch.nn.Module, model_source: str, out_dir: Path) -> None:
        save_dapt_model(model, model_source, out_dir)

    def restore(self, model: torch.nn.Module, checkpoint_dir: Path) -> None:
        """Resume: the student's towers, its heads and temperature, the ratio EMA, the teacher, the momentum
        encoders and their queue."""
        # Read in fp32, as saved: the live model decides each weight's dtype (trainable ones are fp32 under DDP).
        restored = load_dapt_model(str(checkpoint_dir), distill=model.teacher is not None,
                                   itc_queue_size=model.momentum.queue_size if model.momentum is not None else 0)
        model.load_state_dict(restored.state_dict())
