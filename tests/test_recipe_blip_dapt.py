"""BLIP DAPT: the three losses fall, hard negatives, the ITC queue of momentum features, EMA teacher and the
distillation terms' adaptive weights, the save layout."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BlipForQuestionAnswering

from medvl.models.base import GenerationSettings
from medvl.models.blip_caption import save_tiny_blip
from medvl.models.blip_dapt import (
    HEADS_FILE,
    MOMENTUM_FILE,
    TEACHER_FILE,
    DaptPreprocessor,
    caption_of,
    contrastive_loss,
    group_index,
    hard_negatives,
    load_dapt_model,
    vision_states,
)
from medvl.models.distill import (
    distillation_mses,
    distilled_total,
    ema_momentum,
    ema_update,
    smooth_ratios,
    task_weights,
)
from medvl.models.registry import build_recipe
from medvl.spec import parse_spec

COLOURS = {"black": (0, 0, 0), "white": (255, 255, 255), "red": (255, 0, 0), "blue": (0, 0, 255)}
SIZE = 32


def png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def shard_rows(captions: list[str], groups: list[str], questions: list[str] | None = None) -> dict[str, np.ndarray]:
    n = len(captions)
    colours = list(COLOURS.values())
    column = lambda values: np.asarray(values, dtype=object)
    return {
        "id": column([f"r{i}" for i in range(n)]), "group_id": column(groups), "split": column(["train"] * n),
        "image": column([png(colours[i % len(colours)]) for i in range(n)]), "text": column(captions),
        "question": column(questions or [""] * n), "answer": column(["no"] * n if questions else [""] * n),
        "answer_type": column(["closed"] * n if questions else [""] * n), "meta": column(["{}"] * n),
    }


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory) -> str:
    texts = [f"{name} square" for name in COLOURS] * 5 + ["is there a fracture? no"]
    return save_tiny_blip(BlipForQuestionAnswering, tmp_path_factory.mktemp("dapt"), texts, SIZE)


def dapt_recipe(distill: bool = False, **model):
    return build_recipe(parse_spec({
        "name": "t", "output_dir": "/tmp/unused", "stages": ["train"],
        "data": {"image_size": SIZE, "max_text_length": 8},
        "model": {"recipe": "blip_dapt", "preset": "tiny", "distill": distill, **model},
        "train": {"weight_decay": 0.0},
        "eval": {"num_beams": 2, "max_new_tokens": 5},
    }))


def colour_batch(recipe, source: str, groups: list[str] | None = None) -> dict[str, torch.Tensor]:
    captions = [f"{name} square" for name in COLOURS]
    out = recipe.preprocessor(source)(shard_rows(captions, groups or captions))
    return {name: torch.as_tensor(out[name]) for name in recipe.tensor_columns}


ALL_PAIRS = [(i, j) for i in range(4) for j in range(4) if i != j]
# every mismatched (image, text) pair as an ITM negative: a deterministic ITM loss, unlike mined negatives
EVERY_NEGATIVE = (torch.tensor([i for i, _ in ALL_PAIRS]), torch.tensor([j for _, j in ALL_PAIRS]),
                  torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
PRIOR_ONLY_ITM = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))  # 0.562: predicting "match" 1 time in 4


pytestmark = pytest.mark.usefixtures("one_thread")


def eval_losses(model, batch) -> list[float]:
    model.eval()
    with torch.no_grad():
        losses = model.student.task_losses(batch, EVERY_NEGATIVE).losses
    model.train()
    return losses.tolist()


def test_all_three_losses_are_computed_and_fall(tiny_source):
    recipe = dapt_recipe()
    batch = colour_batch(recipe, tiny_source)
    torch.manual_seed(0)
    model = recipe.load_for_training(tiny_source)
    before = eval_losses(model, batch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    model.train()
    for _ in range(40):
        loss, extras = recipe.loss(model, batch)
        assert loss.item() == pytest.approx(extras["loss_itc"] + extras["loss_itm"] + extras["loss_lm"], rel=1e-5)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    (itc0, itm0, lm0), (itc, itm, lm) = before, eval_losses(model, batch)
    assert itc0 == pytest.approx(math.log(4), abs=0.15)  # collapsed features at init: chance
    assert itc < 0.5 * itc0 and lm < 0.1 * lm0
    assert itm < itm0 and itm < PRIOR_ONLY_ITM - 0.1, (itm0, itm)  # it matches, not just learns the 1:3 prior


def test_contrastive_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    expected = math.log(1 + math.exp(-2))  # -log(e²/(e²+1)), the same both ways
    assert contrastive_loss(logits, torch.eye(2, dtype=torch.bool)).item() == pytest.approx(expected, rel=1e-6)
    # two rows of one group: each row's target is split between both columns
    same_group = torch.ones(2, 2, dtype=torch.bool)
    assert contrastive_loss(logits, same_group).item() == pytest.approx(
        -0.5 * (math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(1 / (math.exp(2) + 1))), rel=1e-6)


def test_hard_negatives_never_pick_a_positive_and_skip_rows_without_one():
    torch.manual_seed(0)
    groups = torch.tensor([0, 0, 1, 2])
    positives = groups[:, None] == groups[None, :]
    for _ in range(20):
        images, neg_texts, texts, neg_images = hard_negatives(torch.randn(4, 4), positives)
        assert images.tolist() == [0, 1, 2, 3] and texts.tolist() == [0, 1, 2, 3]
        assert (groups[images] != groups[neg_texts]).all() and (groups[texts] != groups[neg_images]).all()
    logits = torch.tensor([[0.0, 5.0, 1.0], [5.0, 0.0, 1.0], [1.0, 3.0, 0.0]])
    _, hardest, _, _ = hard_negatives(logits, torch.eye(3, dtype=torch.bool), sample=False)
    assert hardest.tolist() == [1, 0, 1]  # the most similar non-positive text
    one_group = torch.ones(2, 2, dtype=torch.bool)
    assert all(t.numel() == 0 for t in hard_negatives(torch.randn(2, 2), one_group))


def test_ema_update_equals_the_formula_on_a_two_parameter_module():
    teacher, student = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    with torch.no_grad():
        teacher.weight.fill_(1.0), teacher.bias.fill_(2.0)
        student.weight.fill_(3.0), student.bias.fill_(-1.0)
    ema_update(teacher, student, tau=0.9)
    assert teacher.weight.item() == pytest.approx(0.9 * 1.0 + 0.1 * 3.0)  # 1.2
    assert teacher.bias.item() == pytest.approx(0.9 * 2.0 + 0.1 * -1.0)  # 1.7
    assert student.weight.item() == 3.0 and student.bias.item() == -1.0


def test_ema_momentum_rises_linearly_then_holds():
    assert ema_momentum(0, 100, 0.95, 0.995) == pytest.approx(0.95)
    assert ema_momentum(50, 100, 0.95, 0.995) == pytest.approx(0.9725)
    assert ema_momentum(100, 100, 0.95, 0.995) == pytest.approx(0.995)
    assert ema_momentum(150, 100, 0.95, 0.995) == pytest.approx(0.995)


def test_adaptive_weights_sum_to_one_and_favour_the_lagging_task():
    weights = task_weights(torch.tensor([0.9, 1.2, 1.0]))
    exps = [math.exp(0.9), math.exp(1.2), math.exp(1.0)]
    assert weights.tolist() == pytest.approx([e / sum(exps) for e in exps])  # 0.2894, 0.3907, 0.3199
    assert weights.sum().item() == pytest.approx(1.0)
    assert weights.argmax().item() == 1
    smoothed = smooth_ratios(torch.ones(3), torch.tensor([2.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 2.0]))
    assert smoothed.tolist() == pytest.approx([1.1, 1.0, 0.95])


def test_distilled_total_weights_the_distillation_terms_only():
    task = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    distillation = torch.tensor([4.0, 5.0, 6.0], requires_grad=True)
    total = distilled_total(task, distillation, torch.tensor([0.2, 0.3, 0.5]))
    assert total.item() == pytest.approx((1 + 2 + 3) + (0.2 * 4 + 0.3 * 5 + 0.5 * 6))  # 6 + 5.3
    total.backward()
    assert task.grad.tolist() == [1.0, 1.0, 1.0]  # every task loss at weight 1
    assert distillation.grad.tolist() == pytest.approx([0.2, 0.3, 0.5])


def test_distillation_mses_by_hand_and_the_teacher_gets_no_gradient():
    student = {"a": torch.tensor([[1.0, 2.0]], requires_grad=True), "b": torch.tensor([0.0, 3.0], requires_grad=True)}
    teacher = {"a": torch.tensor([[0.0, 0.0]], requires_grad=True), "b": torch.tensor([1.0, 1.0], requires_grad=True)}
    mses = distillation_mses(student, teacher, ("a", "b"))
    assert mses.tolist() == pytest.approx([(1 + 4) / 2, (1 + 4) / 2])
    mses.sum().backward()
    assert teacher["a"].grad is None and teacher["b"].grad is None
    assert student["a"].grad[0].tolist() == pytest.approx([1.0, 2.0])  # d/ds mean((s−t)²) = 2(s−t)/n


def test_total_loss_with_distillation_matches_a_hand_computation(tiny_source):
    """Σ task losses + Σ w·MSE, recomputed from the student's and the teacher's own outputs."""
    recipe = dapt_recipe(distill=True)
    batch = colour_batch(recipe, tiny_source)
    torch.manual_seed(0)
    model = recipe.load_for_training(tiny_source)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in (1, 2, 3):  # the teacher now trails the student: every term is non-zero
        recipe.loss(model, batch)[0].backward()
        optimizer.step()
        optimizer.zero_grad()
        recipe.after_optimizer_step(model, step, 10)
    model.eval()  # hardest negatives and no ratio update: the same computation twice
    with torch.no_grad():
        out = model(**batch)
        student = model.student.task_losses(batch)
        teacher = model.teacher.task_losses(batch, student.negatives)
    mse = {task: ((student.outputs[task] - teacher.outputs[task]) ** 2).mean().item() for task in ("itc", "itm", "lm")}
    ratios = model.ratio_ema.tolist()
    weights = [math.exp(r) / sum(math.exp(q) for q in ratios) for r in ratios]
    expected = sum(student.losses.tolist()) + sum(w * mse[t] for w, t in zip(weights, ("itc", "itm", "lm")))
    assert all(value > 1e-6 for value in mse.values()), mse
    assert ratios != [1.0, 1.0, 1.0]  # the weights moved away from equal
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert [out[f"mse_{t}"].item() for t in ("itc", "itm", "lm")] == pytest.approx(list(mse.values()), rel=1e-5)
    assert out["loss"].item() > sum(student.losses.tolist())


def test_distillation_teacher_is_frozen_follows_the_ema_and_weights_sum_to_one(tiny_source):
    recipe = dapt_recipe(distill=True, ema_tau_start=0.9, ema_tau_end=0.99)
    batch = colour_batch(recipe, tiny_source)
    torch.manual_seed(0)
    model = recipe.load_for_training(tiny_source)
    assert all(not p.requires_grad for p in model.teacher.parameters())
    model.train()
    assert not model.teacher.training and model.student.training
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable}.isdisjoint(id(p) for p in model.teacher.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)

    loss, extras = recipe.loss(model, batch)
    # step 0: the teacher is the student, so the distillation terms vanish and the weights are equal
    assert extras["teacher_lm"] == pytest.approx(extras["loss_lm"], rel=1e-5)
    assert loss.item() == pytest.approx(extras["loss_itc"] + extras["loss_itm"] + extras["loss_lm"], rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    teacher_before = model.teacher.itm_head.weight.detach().clone()
    optimizer.step()
    recipe.after_optimizer_step(model, step=5, total_steps=10)  # τ = 0.9 + 0.5·0.09 = 0.945
    expected = 0.945 * teacher_before + 0.055 * model.student.itm_head.weight.detach()
    assert torch.allclose(model.teacher.itm_head.weight, expected, atol=1e-7)

    _, extras = recipe.loss(model, batch)
    weights = [extras[f"weight_{t}"] for t in ("itc", "itm", "lm")]
    assert sum(weights) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ ITC queue


def queue_recipe(size: int, **model):
    return dapt_recipe(itc_queue_size=size, **model)


def student_features(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The student's normalised ITC features and temperature (tiny BLIP has no dropout: deterministic)."""
    net = model.student
    image = vision_states(net.blip.vision_model, batch["pixel_values"])[:, 0]
    text = net.blip.text_encoder(input_ids=batch["text_input_ids"],
                                 attention_mask=batch["text_attention_mask"]).last_hidden_state[:, 0]
    scale = net.logit_scale.clamp(max=math.log(100.0)).exp()
    return (torch.nn.functional.normalize(net.vision_proj(image), dim=-1),
            torch.nn.functional.normalize(net.text_proj(text), dim=-1), scale)


def test_queued_negatives_enter_the_itc_loss(tiny_source):
    recipe = queue_recipe(8)
    first = colour_batch(recipe, tiny_source, groups=["a1", "a2", "a3", "a4"])
    second = colour_batch(recipe, tiny_source, groups=["b1", "b2", "b3", "b4"])
    torch.manual_seed(0)
    model = recipe.load_for_training(tiny_source)
    model.train()
    assert int(model.momentum.queue_filled) == 0
    with torch.no_grad():
        model(**first)  # the first batch's momentum features join the queue
        assert int(model.momentum.queue_filled) == 4
        queued_images, queued_texts = model.momentum.image_queue[:4].clone(), model.momentum.text_queue[:4].clone()
        keys = model.momentum.keys(second)
        torch.manual_seed(1)
        with_queue = model(**second)

        # by hand: the second batch against its own momentum features, then the 4 queued ones (other groups)
        image, text, scale = student_features(model, second)
        all_texts = torch.cat([keys.texts[:4], queued_texts])
        all_images = torch.cat([keys.images[:4], queued_images])
        positives = torch.zeros(4, 8, dtype=torch.bool)
        positives[range(4), range(4)] = True
        expected = contrastive_loss(scale * image @ all_texts.T, positives, scale * text @ all_images.T, positives)
        in_batch_only = contrastive_loss(scale * image @ keys.texts[:4].T, positives[:, :4],
                                         scale * text @ keys.images[:4].T, positives[:, :4])
    assert with_queue["loss_itc"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert with_queue["loss_itc"].item() > in_batch_only.item() + 1e-4  # 4 more negatives in every softmax
    assert int(model.momentum.queue_filled) == 8


def test_queued_features_of_the_same_group_are_positives_and_the_queue_is_a_ring(tiny_source):
    recipe = queue_recipe(6)
    batch = colour_batch(recipe, tiny_source, groups=["a", "b", "c", "d"])
    torch.manual_seed(0)
    model = recipe.load_for_training(tiny_source)
    model.train()
    with torch.no_grad():
        model(**batch)
        keys = model.momentum.keys(batch)
        assert keys.groups.tolist() == [group_index(g) for g in "abcd"] * 2  # the batch, then its queued copy
        model(**batch)  # 8 features into 6 rows: the ring wraps
    assert int(model.momentum.queue_filled) == 6 and int(model.momentum.queue_ptr) == 2
    assert model.momentum.group_queue.tolist() == [group_index(g) for g in "cdcdab"]


def test_momentum_encoders_follow_the_student_and_validation_contrasts_in_batch(tiny_source):
    recipe = queue_recipe(16)
    batch = colour_batch(recipe, tiny_source)
    torch.manual_seed(0)
    model = recipe.load_for_training(tiny_source)
    assert not any(p.requires_grad for p in model.momentum.parameters())
    momentum_before = model.momentum.vision_proj.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    recipe.loss(model, batch)[0].backward()
    optimizer.step()
    recipe.after_optimizer_step(model, 1, 10)
    student = model.student.vision_proj.weight.detach()
    assert torch.allclose(model.momentum.vision_proj.weight, 0.995 * momentum_before + 0.005 * student, atol=1e-7)

    plain = dapt_recipe().load_for_training(tiny_source)
    plain.student.load_state_dict(model.student.state_dict())
    model.eval(), plain.eval()
    with torch.no_grad():
        assert model(**batch)["loss_itc"].item() == pytest.approx(plain(**batch)["loss_itc"].item(), rel=1e-6)


def test_save_restores_the_momentum_encoders_and_the_queue(tiny_source, tmp_path: Path):
    recipe = queue_recipe(8, distill=True)
    batch = colour_batch(recipe, tiny_source)
    torch.manual_seed(0)
    model = recipe.load_for_training(tiny_source)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in (1, 2):
        recipe.loss(model, batch)[0].backward()
        optimizer.step()
        optimizer.zero_grad()
        recipe.after_optimizer_step(model, step, 10)
    recipe.save(model, tiny_source, tmp_path)
    assert (tmp_path / MOMENTUM_FILE).is_file()
    fresh = recipe.load_for_training(tiny_source)
    recipe.restore(fresh, tmp_path)
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    assert int(fresh.momentum.queue_filled) == 8
    assert load_dapt_model(str(tmp_path), distill=False).momentum is None  # inference needs no queue


def test_the_vit_runs_at_another_resolution_than_its_checkpoint(tiny_source):
    """DAPT at 224 px from a 384 px checkpoint: position embeddings interpolated (here 32 px → 64 px)."""
    recipe = dapt_recipe()
    model = recipe.load_for_training(tiny_source)
    pixels = torch.randn(2, 3, 2 * SIZE, 2 * SIZE)
    assert vision_states(model.student.blip.vision_model, pixels).shape[1] == 1 + (2 * SIZE // 16) ** 2
    batch = colour_batch(recipe, tiny_source)
    batch["pixel_values"] = torch.nn.functional.interpolate(batch["pixel_values"], scale_factor=2)
    assert torch.isfinite(recipe.loss(model, batch)[0])


def test_preprocessor_falls_back_to_question_and_answer_and_marks_groups(tiny_source):
    recipe = dapt_recipe()
    rows = shard_rows(["black square", "", ""], ["a", "b", "b"], questions=["", "is there a fracture?", "x?"])
    out = recipe.preprocessor(tiny_source)(rows)
    assert isinstance(recipe.preprocessor(tiny_source), DaptPreprocessor)
    assert list(out["text"]) == ["black square", "is there a fracture? no", "x? no"]
    assert caption_of("  ", "q?", "yes") == "q? yes"
    assert out["group_index"][1] == out["group_index"][2] != out["group_index"][0]
    assert out["group_index"][0] == group_index("a")
    mask = out["attention_mask"][0]
    assert out["input_ids"][0][mask.sum() - 1] == 3  # [sep] ends the decoder input
    assert out["text_input_ids"][0][0] == 2  # the tiny tokenizer's [cls] is its [bos]


def test_save_layout_loads_into_blip_vqa_and_restores_heads_and_teacher(tiny_source, tmp_path: Path):
    recipe = dapt_recipe(distill=True)
    batch = colour_batch(recipe, tiny_source)
    torch.manual_seed(0)
    model = recipe.load_for_training(tiny_source)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in (1, 2):
        recipe.loss(model, batch)[0].backward()
        optimizer.step()
        optimizer.zero_grad()
        recipe.after_optimizer_step(model, step, 10)
    recipe.save(model, tiny_source, tmp_path)
    assert {"config.json", "model.safetensors", HEADS_FILE, TEACHER_FILE} <= {p.name for p in tmp_path.iterdir()}

    vqa = BlipForQuestionAnswering.from_pretrained(tmp_path)
    vqa_state = vqa.state_dict()
    for name, value in model.student.blip.state_dict().items():
        assert torch.equal(vqa_state[name], value), name

    reloaded = load_dapt_model(str(tmp_path), distill=True)
    for name, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name
    assert not torch.equal(model.teacher.itm_head.weight, model.student.itm_head.weight)

    fresh = recipe.load_for_training(tiny_source)
    recipe.restore(fresh, tmp_path)
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


def test_generate_writes_scored_captions_and_attention_maps(tiny_source, tmp_path: Path):
    recipe = dapt_recipe()
    model = recipe.load_for_training(tiny_source)
    recipe.save(model, tiny_source, tmp_path)
    loaded = recipe.load_for_inference(str(tmp_path))
    batch = colour_batch(recipe, tiny_source)
    scored = recipe.generate_scored(loaded, batch, GenerationSettings.from_eval(recipe.spec.eval))
    assert len(scored.texts) == 4 and all(isinstance(t, str) for t in scored.texts)
    assert all(0.0 < p < 1.0 for p in scored.mean_token_probs)
    maps = recipe.attention_maps(loaded, batch, scored.texts)
    assert maps.shape[0] == 4 and maps.shape[1] == maps.shape[2]
    assert np.allclose(maps.sum(axis=(1, 2)), 1.0)
