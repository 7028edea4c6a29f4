"""Mean token probability of generated texts, and BLIP's decoder cross-attention maps."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import BlipForConditionalGeneration

from medvl.models.base import GenerationSettings
from medvl.models.blip_common import blip_attention_maps, save_tiny_blip
from medvl.models.scored_generation import mean_token_probabilities
from tests.test_recipe_roco import CAPTIONS, SIZE, caption_batch, caption_recipe

pytestmark = pytest.mark.usefixtures("one_thread")
EOS = 9


def test_mean_token_probability_counts_tokens_through_the_first_eos():
    log_probs = torch.log(torch.tensor([[0.5, 0.25, 1.0, 0.1], [0.8, 0.6, 0.4, 0.2]]))
    tokens = torch.tensor([[4, EOS, EOS, 5], [4, 5, 6, 7]])  # row 0 stops at its first EOS; row 1 never stops
    assert mean_token_probabilities(log_probs, tokens, EOS) == pytest.approx([(0.5 + 0.25) / 2, 0.5])


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    return save_tiny_blip(BlipForConditionalGeneration, tmp_path_factory.mktemp("scored"), CAPTIONS * 5, SIZE)


def teacher_forced_mean_probabilities(model, pixel_values: torch.Tensor, sequences: torch.Tensor) -> list[float]:
    """Feed each generated ``[bos] tokens… [sep]`` back through the decoder; average the probability of every
    token after bos up to the first sep (what the model gives its own text when reading it)."""
    sep = model.config.text_config.sep_token_id
    with torch.no_grad():
        image = model.vision_model(pixel_values=pixel_values).last_hidden_state
        logits = model.text_decoder(input_ids=sequences, encoder_hidden_states=image).logits
    probs = logits[:, :-1].softmax(-1).gather(-1, sequences[:, 1:, None])[..., 0]
    means = []
    for row, tokens in zip(probs, sequences[:, 1:].tolist()):
        length = tokens.index(sep) + 1 if sep in tokens else len(tokens)
        means.append(row[:length].mean().item())
    return means


@pytest.mark.parametrize("beams", [1, 3])
def test_mean_token_probability_is_what_the_model_gives_its_own_text(tiny_folder, beams):
    """The score of each generated text equals the probabilities the decoder assigns when reading it back."""
    recipe = caption_recipe(tiny_folder)
    settings = GenerationSettings(num_beams=beams, max_new_tokens=12)
    loaded = recipe.load_for_inference(tiny_folder)
    model = loaded.module
    batch = caption_batch(recipe, tiny_folder)
    generated = recipe.generate_scored(loaded, batch, settings)
    assert generated.texts == recipe.generate(loaded, batch, settings)
    sequences = model.generate(pixel_values=batch["pixel_values"], num_beams=beams, max_new_tokens=12)
    expected = teacher_forced_mean_probabilities(model, batch["pixel_values"], sequences)
    assert all(0.0 < score < 1.0 for score in generated.mean_token_probs)
    assert generated.mean_token_probs == pytest.approx(expected, rel=1e-4)


def test_attention_maps_sum_to_one_over_the_patch_grid_and_ignore_padding(tiny_folder):
    recipe = caption_recipe(tiny_folder)
    loaded = recipe.load_for_inference(tiny_folder)
    model = loaded.module
    pixels = caption_batch(recipe, tiny_folder)["pixel_values"]
    maps = recipe.attention_maps(loaded, pixels_batch := {"pixel_values": pixels}, CAPTIONS)
    side = SIZE // model.config.vision_config.patch_size
    assert maps.shape == (4, side, side)
    assert np.allclose(maps.sum(axis=(1, 2)), 1.0) and (maps >= 0).all()
    assert not np.allclose(maps[0], maps[3])  # different images, different maps
    longer = blip_attention_maps(model, loaded.tokenizer, pixels_batch["pixel_values"], CAPTIONS, max_length=30)
    assert np.allclose(maps, longer, atol=1e-6)  # padding positions are not averaged in
