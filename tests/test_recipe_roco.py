"""ROCO captioning (blip_caption): each fine-tuning policy trains exactly its part; save → from_pretrained round trip."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BlipForConditionalGeneration

from medvl.models.base import GenerationSettings
from medvl.models.blip_caption import apply_blip_finetune_policy, save_tiny_blip
from medvl.models.registry import build_recipe
from medvl.spec import parse_spec

SIZE = 32
CAPTIONS = ["axial ct of the abdomen", "chest x-ray with effusion", "mri of the brain", "ultrasound of the liver"]
TRAINED_PREFIX = {"full": "", "decoder": "text_decoder.", "encoder": "vision_model."}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    return save_tiny_blip(BlipForConditionalGeneration, tmp_path_factory.mktemp("roco"), CAPTIONS * 5, SIZE)


def caption_recipe(folder: str, finetune: str = "full"):
    """The recipe as jobs/roco_blip_caption.yaml configures it, pointed at a local folder instead of the hub."""
    return build_recipe(parse_spec({
        "name": "t", "output_dir": "/tmp/unused", "stages": ["train"],
        "data": {"image_size": SIZE, "max_text_length": 12},
        "model": {"recipe": "blip_caption", "name_or_path": folder},
        "train": {"finetune": finetune, "weight_decay": 0.0},
        "eval": {"num_beams": 2, "max_new_tokens": 6},
    }))


def caption_batch(recipe, folder: str) -> dict[str, torch.Tensor]:
    def png(shade: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (SIZE, SIZE), (shade, shade, shade)).save(buffer, format="PNG")
        return buffer.getvalue()

    column = lambda values: np.asarray(values, dtype=object)
    rows = {"id": column(list("abcd")), "group_id": column(list("abcd")), "split": column(["train"] * 4),
            "image": column([png(s) for s in (0, 80, 160, 240)]), "text": column(CAPTIONS),
            "question": column([""] * 4), "answer": column([""] * 4), "answer_type": column([""] * 4),
            "meta": column(["{}"] * 4)}
    out = recipe.preprocessor(folder)(rows)
    return {name: torch.as_tensor(out[name]) for name in recipe.tensor_columns}


@pytest.mark.parametrize("policy", ["full", "decoder", "encoder"])
def test_one_step_moves_exactly_the_trained_part(tiny_folder, policy):
    recipe = caption_recipe(tiny_folder, policy)
    model = BlipForConditionalGeneration.from_pretrained(tiny_folder)
    apply_blip_finetune_policy(model, policy)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    model.train()
    recipe.loss(model, caption_batch(recipe, tiny_folder))[0].backward()
    optimizer.step()

    trained = [n for n, _ in model.named_parameters() if n.startswith(TRAINED_PREFIX[policy])]
    assert (len(trained) == len(before)) == (policy == "full") and trained
    for name, parameter in model.named_parameters():
        if name.startswith(TRAINED_PREFIX[policy]):
            assert parameter.requires_grad and not torch.equal(parameter, before[name]), f"{name} did not train"
        else:
            assert not parameter.requires_grad and torch.equal(parameter, before[name]), f"{name} moved"


def test_save_then_from_pretrained_round_trip(tiny_folder, tmp_path: Path):
    recipe = caption_recipe(tiny_folder)
    assert recipe.initial_model(tmp_path, list) == tiny_folder  # no preset: the named weights as they are
    model = recipe.load_for_training(tiny_folder)
    batch = caption_batch(recipe, tiny_folder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    recipe.loss(model, batch)[0].backward()
    optimizer.step()
    recipe.save(model, tiny_folder, tmp_path)

    loaded = recipe.load_for_inference(str(tmp_path))
    assert not loaded.module.training
    saved_state = loaded.module.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(saved_state[name], value), name
    model.eval()
    with torch.no_grad():
        assert recipe.loss(loaded.module, batch)[0].item() == pytest.approx(recipe.loss(model, batch)[0].item(),
                                                                            rel=1e-6)
    captions = recipe.generate(loaded, batch, GenerationSettings.from_eval(recipe.spec.eval))
    assert len(captions) == 4 and all(isinstance(c, str) for c in captions)
    assert recipe.preprocessor(str(tmp_path)).tokenizer.get_vocab() == recipe.preprocessor(tiny_folder).tokenizer.get_vocab()
