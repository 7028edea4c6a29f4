"""train.gradient_checkpointing for every recipe: the same loss and gradients with and without (dropout on, seeds
fixed), fewer activations kept for backward with it, and the engine switches it on from either spec key."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medvl.data.synthetic import synthetic_records
from medvl.models.checkpointing import enable_gradient_checkpointing
from medvl.models.registry import build_recipe
from medvl.spec import parse_spec
from tests.batches import shard_batch

SIZE = 32

pytestmark = pytest.mark.usefixtures("one_thread")

# (recipe, model settings, train.finetune): every recipe, and each way a recipe trains its language model
CASES = [
    ("blip_caption", {}, "full"),
    ("blip_vqa", {}, "full"),
    ("blip_dapt", {"distill": True}, "full"),
    ("blip2", {}, "lora"),
    ("blip2", {}, "full"),
    ("softprompt_llm", {}, "full"),
    ("softprompt_llm", {"lm_lora": False}, "frozen_vision"),
]


def spec_for(recipe: str, model: dict, finetune: str, **train):
    return parse_spec({
        "name": "gc", "output_dir": "/tmp/unused", "stages": ["train"],
        "data": {"task": "vqa" if recipe == "blip_vqa" else "caption", "image_size": SIZE, "max_text_length": 24,
                 "max_question_length": 12},
        "model": {"recipe": recipe, "preset": "tiny", "num_prefix_tokens": 4, **model},
        "train": {"finetune": finetune, **train},
    })


@pytest.fixture(scope="module")
def records():
    return list(synthetic_records(3, image_size=48, task="vqa"))[:4]


def tiny_model(recipe, records, folder: Path):
    texts = [text for r in records for text in (r.text, r.question, r.answer)]
    source = recipe.initial_model(folder, lambda: iter(texts))
    batch = recipe.preprocessor(source)(shard_batch(records))
    return recipe.load_for_training(source), {name: torch.as_tensor(batch[name]) for name in recipe.tensor_columns}


def loss_grads_and_saved_bytes(recipe, model, batch) -> tuple[float, dict[str, torch.Tensor], int]:
    """One training forward/backward from a fixed seed; the bytes autograd kept for backward along the way."""
    model.train()
    model.zero_grad(set_to_none=True)
    saved = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, _ = recipe.loss(model, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, saved[0]


@pytest.mark.parametrize("name, model_settings, finetune", CASES, ids=[f"{c[0]}-{c[2]}-{len(c[1])}" for c in CASES])
def test_checkpointing_keeps_the_loss_and_gradients_and_keeps_fewer_activations(
        tmp_path, records, name, model_settings, finetune):
    recipe = build_recipe(spec_for(name, model_settings, finetune))
    model, batch = tiny_model(recipe, records, tmp_path)
    plain_loss, plain_grads, plain_saved = loss_grads_and_saved_bytes(recipe, model, batch)
    enable_gradient_checkpointing(model)
    loss, grads, saved = loss_grads_and_saved_bytes(recipe, model, batch)

    assert loss == pytest.approx(plain_loss, rel=1e-5)
    assert grads.keys() == plain_grads.keys() and grads
    for key, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[key], rtol=1e-4, atol=1e-6, msg=key)
    assert saved < 0.8 * plain_saved, (saved, plain_saved)


@pytest.mark.parametrize("train", [{"gradient_checkpointing": True},
                                   {"deepspeed": {"activation_checkpointing": True}}],  # the old key, an alias
                         ids=["gradient_checkpointing", "deepspeed.activation_checkpointing"])
def test_the_ddp_engine_switches_it_on_from_either_key(tmp_path, records, monkeypatch, train):
    import ray.train.torch

    from medvl.train.engines import DdpEngine

    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda model: model)  # no Train worker group here
    spec = spec_for("blip_caption", {}, "full", **train)
    assert spec.train.checkpoints_activations
    recipe = build_recipe(spec)
    source = recipe.initial_model(tmp_path, lambda: iter([r.text for r in records]))
    engine = DdpEngine(spec, recipe, source, total_steps=1)
    layers = [m for m in engine.unwrapped.modules() if hasattr(m, "gradient_checkpointing")]
    assert layers and all(m.gradient_checkpointing for m in layers)

    off = DdpEngine(spec_for("blip_caption", {}, "full"), recipe, source, total_steps=1)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in off.unwrapped.modules())
