"""Every registered recipe goes through the same tiny path: build → train a few steps → save → load → generate →
answer one serve request. A new recipe gets these checks by registering its card; its own test file covers what
is special about it.

In-process and without Ray (the Ray Train, eval and Serve wiring have their own tests): what this pins down is
the contract of :class:`medvl.models.base.Recipe` that those stages rely on.
"""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medvl.data.records import SHARD_COLUMNS
from medvl.models.base import GenerationSettings, LoadedModel
from medvl.models.registry import RECIPES, build_recipe
from medvl.serve.requests import parse_json
from medvl.spec import parse_spec

SIZE = 32
REPORTS = ["the heart size is normal. no effusion.", "small left pleural effusion.",
           "right upper zone nodule.", "large right pneumothorax."]
QUESTIONS = ["is there an effusion?", "is the heart enlarged?", "where is the nodule?", "is there a pneumothorax?"]
ANSWERS = ["no", "no", "right upper zone", "yes"]
STEPS = 8

pytestmark = pytest.mark.usefixtures("one_thread")


def png(shade: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.full((SIZE, SIZE, 3), shade, dtype=np.uint8)
    pixels[: SIZE // 2, : SIZE // 2] = 255 - shade  # something for the image encoder to see
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def shard_rows() -> dict[str, np.ndarray]:
    values = {"id": list("abcd"), "group_id": list("abcd"), "split": ["train"] * 4,
              "image": [png(s) for s in (0, 80, 160, 240)], "text": REPORTS, "question": QUESTIONS,
              "answer": ANSWERS, "answer_type": ["CLOSED", "CLOSED", "OPEN", "CLOSED"], "meta": ["{}"] * 4}
    out = {}
    for name in SHARD_COLUMNS:
        column = np.empty(4, dtype=object)
        column[:] = values[name]
        out[name] = column
    return out


def tiny_job(name: str, out: Path) -> dict:
    card = RECIPES[name]
    return {"name": "contract", "output_dir": str(out), "stages": ["train", "serve"],
            "data": {"task": card.data_task or "caption", "image_size": SIZE, "max_text_length": 24,
                     "max_question_length": 12},
            "model": {"recipe": name, "preset": "tiny", "lora_r": 4} if "lora_r" in card.options
            else {"recipe": name, "preset": "tiny"},
            "train": {"finetune": card.finetune[0], "lr": 5e-3, "weight_decay": 0.0, "warmup_ratio": 0.0},
            "eval": {"num_beams": 1, "max_new_tokens": 4}, "serve": {"max_new_tokens": 4}}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_trains_saves_loads_generates_and_serves(name: str, tmp_path: Path):
    torch.manual_seed(0)
    spec = parse_spec(tiny_job(name, tmp_path / "run"))
    RECIPES[name].check(spec)
    recipe = build_recipe(spec)
    texts = REPORTS + QUESTIONS + ANSWERS
    source = recipe.initial_model(tmp_path / "start", lambda: iter(texts * 5))

    batch = recipe.preprocessor(source)(shard_rows())
    tensors = {column: torch.as_tensor(batch[column]) for column in recipe.tensor_columns}
    model = recipe.load_for_training(source)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert 0 < sum(p.numel() for p in trainable) <= sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=spec.train.lr)
    model.train()
    losses = []
    for step in range(STEPS):
        loss, _ = recipe.loss(model, tensors)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        recipe.after_optimizer_step(model, step + 1, STEPS)
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses

    saved = tmp_path / "saved"
    recipe.save(model, source, saved)
    loaded = recipe.load_for_inference(str(saved))
    assert isinstance(loaded, LoadedModel) and not loaded.module.training
    with torch.inference_mode():
        generated = recipe.generate_scored(loaded, tensors, GenerationSettings.from_eval(spec.eval))
    assert len(generated.texts) == 4 and all(isinstance(t, str) for t in generated.texts)
    assert all(0.0 < p <= 1.0 for p in generated.mean_token_probs)

    answers = serve_one_request(spec, str(saved), question=QUESTIONS[0] if recipe.task == "vqa" else "")
    assert isinstance(answers[0], dict), answers[0]
    assert isinstance(answers[0]["text"], str) and 0.0 < answers[0]["mean_token_prob"] <= 1.0
    sampled, pieces = answers[1]
    assert isinstance(sampled, dict), sampled  # a sampled, streamed chat request works with every recipe
    assert sampled["text"].startswith("".join(pieces)) and 0.0 < sampled["mean_token_prob"] <= 1.0


def serve_one_request(spec, checkpoint: str, question: str) -> list:
    """What the Serve replica does with one JSON request, without starting Serve: parse it, then run its batch;
    then the same query sampled at temperature 1 and streamed (its answer and the pieces streamed)."""
    import dataclasses

    from medvl.serve.runner import ModelRunner

    server = ModelRunner(spec, checkpoint)
    body = {"image": base64.b64encode(png(120)).decode()} | ({"question": question} if question else {})
    query = parse_json(json.dumps(body).encode(), spec.serve, takes_question=server.takes_question)
    pieces: list[str] = []
    streamed = server.stream("", dataclasses.replace(query, temperature=1.0), pieces.append)
    return [*server.run_batch([query]), (streamed, pieces)]
