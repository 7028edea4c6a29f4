"""BLIP VQA: inputs, the frozen-vision policy, starting from DAPT weights, decoding; one slow dapt → vqa → eval run."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BlipForQuestionAnswering

from medvl.models.base import GenerationSettings
from medvl.models.blip_caption import save_tiny_blip
from medvl.models.blip_vqa import VQA_COLUMNS, generate_answers
from medvl.models.registry import build_recipe
from medvl.spec import parse_spec

SIZE = 32
COLOURS = [(0, 0, 0), (255, 255, 255), (255, 0, 0), (0, 0, 255)]
QUESTIONS = ["is the square black?", "is the square white?", "what colour is it?", "is there a square?"]
ANSWERS = ["yes", "no", "red square", "yes"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory) -> str:
    texts = QUESTIONS * 5 + ANSWERS * 5 + ["black square", "white square", "blue square"] * 5
    return save_tiny_blip(BlipForQuestionAnswering, tmp_path_factory.mktemp("vqa"), texts, SIZE)


def shard_rows(texts: list[str], questions: list[str], answers: list[str]) -> dict[str, np.ndarray]:
    """Four shard rows of solid-colour PNGs, one group each."""
    def png(colour) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (SIZE, SIZE), colour).save(buffer, format="PNG")
        return buffer.getvalue()

    column = lambda values: np.asarray(values, dtype=object)
    return {
        "id": column([f"r{i}" for i in range(4)]), "group_id": column(list("abcd")), "split": column(["train"] * 4),
        "image": column([png(c) for c in COLOURS]), "text": column(texts), "question": column(questions),
        "answer": column(answers), "answer_type": column(["closed"] * 4), "meta": column(["{}"] * 4),
    }


def recipe_for(name: str, finetune: str = "frozen_vision"):
    return build_recipe(parse_spec({
        "name": "t", "output_dir": "/tmp/unused", "stages": ["train"],
        "data": {"task": "vqa", "image_size": SIZE, "max_text_length": 8, "max_question_length": 12},
        "model": {"recipe": name, "preset": "tiny"},
        "train": {"finetune": finetune, "weight_decay": 0.0},
        "eval": {"num_beams": 2, "max_new_tokens": 4},
    }))


def vqa_batch(recipe, source: str) -> dict[str, torch.Tensor]:
    out = recipe.preprocessor(source)(shard_rows([""] * 4, QUESTIONS, ANSWERS))
    return {name: torch.as_tensor(out[name]) for name in recipe.tensor_columns}


def test_preprocessor_encodes_question_for_the_encoder_and_answer_for_the_decoder(tiny_source):
    recipe = recipe_for("blip_vqa")
    assert recipe.tensor_columns == VQA_COLUMNS and recipe.task == "vqa"
    batch = vqa_batch(recipe, tiny_source)
    question, question_mask = batch["question_input_ids"][0], batch["question_attention_mask"][0]
    answer, answer_mask = batch["answer_input_ids"][0], batch["answer_attention_mask"][0]
    assert question.shape == (12,) and answer.shape == (8,)
    assert question[0] == 2 and question[question_mask.sum() - 1] == 3  # [cls] … [sep] (tiny: [cls] = [bos])
    assert answer.tolist()[:3] == [2, recipe.preprocessor(tiny_source).tokenizer(" yes")["input_ids"][0], 3]
    assert answer_mask.tolist() == [1, 1, 1, 0, 0, 0, 0, 0] and answer[3:].eq(0).all()


def one_step(recipe, model, batch) -> dict[str, torch.Tensor]:
    """Parameters before one AdamW step (no weight decay, so only a gradient moves a weight)."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    model.train()
    loss, _ = recipe.loss(model, batch)
    loss.backward()
    optimizer.step()
    return before


@pytest.mark.parametrize("policy", ["frozen_vision", "full"])
def test_policy_freezes_exactly_the_vision_encoder(tiny_source, policy):
    recipe = recipe_for("blip_vqa", policy)
    model = recipe.load_for_training(tiny_source)
    before = one_step(recipe, model, vqa_batch(recipe, tiny_source))
    frozen = policy == "frozen_vision"
    for name, parameter in model.named_parameters():
        is_vision = name.startswith("vision_model.")
        assert parameter.requires_grad == (not (frozen and is_vision)), name
        if frozen and is_vision:
            assert torch.equal(parameter, before[name]), f"{name} moved although frozen"
        else:
            assert not torch.equal(parameter, before[name]), f"{name} did not train"


def test_unknown_policy_is_refused(tiny_source):
    with pytest.raises(ValueError, match="frozen_vision"):
        recipe_for("blip_vqa", "decoder").load_for_training(tiny_source)


def test_vqa_starts_from_the_dapt_weights(tiny_source, tmp_path: Path):
    dapt = recipe_for("blip_dapt", "full")
    model = dapt.load_for_training(tiny_source)
    captions = dapt.preprocessor(tiny_source)(shard_rows(["black square", "white square", "red square", "blue square"],
                                                         QUESTIONS, ANSWERS))
    one_step(dapt, model, {name: torch.as_tensor(captions[name]) for name in dapt.tensor_columns})
    dapt.save(model, tiny_source, tmp_path)

    vqa = recipe_for("blip_vqa").load_for_training(str(tmp_path))
    initial = BlipForQuestionAnswering.from_pretrained(tiny_source).state_dict()
    for name, value in vqa.state_dict().items():
        assert torch.equal(value, model.student.blip.state_dict()[name]), name
    moved = [n for n, v in vqa.state_dict().items() if not torch.equal(v, initial[n])]
    assert any(n.startswith("vision_model.") for n in moved) and any(n.startswith("text_decoder.") for n in moved)


def test_decoding_sees_what_training_saw(tiny_source):
    """The first decoding step's scores give the same answer-token loss as the training forward."""
    recipe = recipe_for("blip_vqa")
    loaded = recipe.load_for_inference(tiny_source)
    model = loaded.module
    batch = vqa_batch(recipe, tiny_source)
    first = generate_answers(model, batch, max_new_tokens=1, output_scores=True, return_dict_in_generate=True)
    answer_ids = batch["answer_input_ids"][:, :2]  # [bos] first-answer-token
    expected = torch.nn.functional.cross_entropy(first.scores[0], answer_ids[:, 1])
    with torch.no_grad():
        trained = model(input_ids=batch["question_input_ids"], attention_mask=batch["question_attention_mask"],
                        pixel_values=batch["pixel_values"], decoder_input_ids=answer_ids, labels=answer_ids).loss
    assert trained.item() == pytest.approx(expected.item(), rel=1e-5)
    scored = recipe.generate_scored(loaded, batch, GenerationSettings.from_eval(recipe.spec.eval))
    assert len(scored.texts) == 4 and all(isinstance(a, str) for a in scored.texts)
    assert all(0.0 < p < 1.0 for p in scored.mean_token_probs)


@pytest.mark.slow
def test_dapt_then_vqa_then_eval_end_to_end(tmp_path: Path, ray_local):
    from safetensors.torch import load_file

    from medvl.stages import run_stages

    spec = parse_spec({
        "name": "tiny_vqa",
        "output_dir": str(tmp_path / "run"),
        "stages": [
            "prepare",
            {"kind": "train", "name": "dapt", "set": {"model.recipe": "blip_dapt", "model.distill": True,
                                                        "train.epochs": 1, "data.max_text_length": 40}},
            {"kind": "train", "name": "vqa", "start_from": "dapt",
             "set": {"train.finetune": "frozen_vision", "train.epochs": 2}},
            "eval",
        ],
        "data": {"format": "synthetic", "task": "vqa", "synthetic_images": 60, "synthetic_image_size": 32,
                 "image_size": 32, "max_text_length": 6, "max_question_length": 12, "records_per_shard": 512,
                 "shuffle_buffer": 0, "split_fractions": [0.6, 0.2, 0.2]},
        "model": {"recipe": "blip_vqa", "preset": "tiny"},
        "train": {"batch_size": 32, "lr": 2e-3, "workers": 1, "cpus_per_worker": 0.5, "early_stopping_patience": 0,
                  "max_val_batches": 2},
        "eval": {"num_beams": 1, "max_new_tokens": 4, "max_samples": 64, "batch_size": 64},
    })
    run_stages(spec)
    out = Path(spec.output_dir)
    dapt = json.loads((out / "dapt" / "train_summary.json").read_text())
    vqa = json.loads((out / "vqa" / "train_summary.json").read_text())
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    print("dapt", dapt["history"], "\nvqa", vqa["history"], "\nmetrics", metrics)

    assert vqa["model_source"] == dapt["model_dir"]
    assert vqa["history"][-1]["val_loss"] < vqa["history"][0]["val_loss"]
    test_rows = json.loads((out / "shards" / "manifest.json").read_text())["counts"]["test"]
    assert {"vqa_acc_closed", "vqa_acc_open", "vqa_acc"} <= metrics.keys() and metrics["n"] == min(64, test_rows)
    # eval.calibrate (on by default): T fitted on the validation answers, saved beside the VQA model, and the
    # answers' ECE at T = 1 beside the calibrated one
    calibration = json.loads((Path(vqa["model_dir"]) / "calibration.json").read_text())
    assert calibration["fitted_on"] == "val" and calibration["tokens"] > 0
    assert metrics["temperature"] == calibration["temperature"]
    assert {"vqa_ece_before", "vqa_ece", "token_ece_before", "token_ece_after"} <= metrics.keys()
    if calibration["temperature"] != 1.0:
        assert metrics["vqa_ece_before"] != metrics["vqa_ece"]
    # The vision encoder the VQA stage exported is the DAPT one, untouched (frozen), and DAPT did move it.
    exported, pretrained = load_file(Path(vqa["model_dir"]) / "model.safetensors"), load_file(
        Path(dapt["model_dir"]) / "model.safetensors")
    initial = load_file(Path(dapt["model_source"]) / "model.safetensors")
    vision = [k for k in exported if k.startswith("vision_model.")]
    assert vision and all(torch.equal(exported[k], pretrained[k]) for k in vision)
    assert not all(torch.equal(pretrained[k], initial[k]) for k in vision)
    assert not torch.equal(exported["text_decoder.bert.embeddings.word_embeddings.weight"],
                           pretrained["text_decoder.bert.embeddings.word_embeddings.weight"])
