"""The shipped configs reproduce the published architectures, built on the meta device (no memory, no Ray)."""
from __future__ import annotations

from importlib import resources

import pytest
import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

from medvl.models.architectures import (
    KNOWN_ARCHITECTURES,
    build_known_on_meta,
    build_on_meta,
    is_on_meta,
    real_config,
)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# Exact counts of what transformers builds from the shipped numbers (see the table in architectures.py).
PUBLISHED_COUNTS = {
    "Salesforce/blip-image-captioning-base": 223_971_644,
    "Salesforce/blip-vqa-base": 361_230_140,
    "Salesforce/blip2-opt-2.7b": 3_744_761_856,
    "gpt2": 124_439_808,  # GPT-2 small, embeddings tied: the well-known 124 M
    "openlm-research/open_llama_3b": 3_426_473_600,
    "openlm-research/open_llama_7b": 6_738_415_616,  # LLaMA-7B's 6.74 B
    "microsoft/resnet-50": 23_508_032,  # torchvision's 25,557,032 less the 2,049,000 of the fc head
}


@pytest.mark.parametrize("hub_id", sorted(KNOWN_ARCHITECTURES))
def test_known_architecture_builds_on_meta_with_its_published_size(hub_id):
    model = build_known_on_meta(hub_id)
    assert is_on_meta(model)
    assert count(model) == PUBLISHED_COUNTS[hub_id]


def test_every_known_id_has_a_shipped_file():
    folder = resources.files("medvl.models") / "configs"
    shipped = {entry.name for entry in folder.iterdir() if entry.name.endswith(".json")}
    assert {f"{name}.json" for name in KNOWN_ARCHITECTURES.values()} == shipped


def test_blip2_parts_match_the_published_breakdown():
    model = build_known_on_meta("Salesforce/blip2-opt-2.7b")
    assert count(model.vision_model) == 985_952_256
    assert count(model.qformer) == 105_137_664
    assert model.query_tokens.numel() == 32 * 768
    assert count(model.language_projection) == 1_968_640
    # OPT-2.7B with the hub's 50,304-row vocabulary (the original 50,272 rows + 32 × 2560)
    assert count(model.language_model) == 2_651_596_800 + 32 * 2560


def test_blip2_with_the_original_vocabulary_is_the_3_74b_anchor():
    config = real_config("blip2-opt-2.7b")
    reference = Blip2Config(
        text_config=OPTConfig(hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32,
                              vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2560).to_dict(),
        num_query_tokens=32,
    )
    config.text_config.vocab_size = 50272
    assert count(build_on_meta(config, Blip2ForConditionalGeneration)) == 3_744_679_936
    assert count(build_on_meta(reference, Blip2ForConditionalGeneration)) == 3_744_679_936


def test_short_names_resolve_and_unknown_names_fail_naming_the_field():
    assert real_config("open_llama_7b").hidden_size == 4096
    assert real_config("Salesforce/blip2-opt-2.7b").num_query_tokens == 32
    assert real_config("/models/cache/resnet-50").hidden_sizes == [256, 512, 1024, 2048]
    with pytest.raises(ValueError, match=r"^model.name_or_path: .*'bert-base-uncased'.*Salesforce/blip2-opt-2.7b"):
        real_config("bert-base-uncased")


def test_each_call_returns_an_independent_config():
    first = real_config("gpt2")
    first.n_layer = 1
    assert real_config("gpt2").n_layer == 12
