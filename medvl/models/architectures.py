"""Real architectures without downloads: the published config numbers of the checkpoints medvl's recipes use.

``model.preset: random`` and ``medvl plan`` need a recipe's *real* architecture (layer counts, widths,
vocabulary) but not its weights: throughput, memory and parameter counts do not depend on what the weights
are. The hub's ``config.json`` files cannot be fetched offline, so their numbers ship with the package as
small JSON files (``medvl/models/configs/*.json``), written from the published configs:

==========================================  ============================  ========================================
hub id                                      shipped file                  parameters (``model_class`` below)
==========================================  ============================  ========================================
``Salesforce/blip-image-captioning-base``   blip-image-captioning-base    223,971,644 (ViT-B/16 384 px, decoder)
``Salesforce/blip-vqa-base``                blip-vqa-base                 361,230,140 (+ question encoder)
``Salesforce/blip2-opt-2.7b``               blip2-opt-2.7b                3,744,761,856 (ViT-g, Q-Former, OPT)
``gpt2``                                    gpt2                          124,439,808 (embeddings tied)
``openlm-research/open_llama_3b``           open_llama_3b                 3,426,473,600 (untied)
``openlm-research/open_llama_7b``           open_llama_7b                 6,738,415,616 (untied)
``microsoft/resnet-50``                     resnet-50                     23,508,032 (``ResNetModel``, no head)
==========================================  ============================  ========================================

Every number that shapes a parameter is written out in the files rather than left to a transformers default,
so that a default changing between transformers versions cannot silently change an architecture. Things to
know about the files:

* BLIP-2 OPT-2.7B carries the hub's current text vocabulary of 50,304 rows (the 2024 revision that added the
  ``<image>`` token, id 50265, padded the OPT embedding from 50,272 to a multiple of 64): 81,920 parameters
  more than the original 3,744,679,936.
* The BLIP base files give the text towers BERT-base's 12 attention heads (the BLIP paper's ``med_config``);
  the head count changes no parameter count.
* The BLIP base text decoders tie their output head to their word embeddings (23,442,432 parameters), as
  transformers 5 builds them; the hub pages' 247 M and 385 M count that matrix twice, as the checkpoints store it.
* ResNet-50 keeps its 1,000-class head in the config (``num_labels``) for ``ResNetForImageClassification``;
  the soft-prompt recipe builds the headless ``ResNetModel``.

:func:`build_on_meta` instantiates a model on PyTorch's meta device: every parameter has a shape and a dtype
but no storage, so a 7B model costs no memory and builds in about a second. That is what ``medvl plan``
counts; ``model.preset: random`` materialises real (random) tensors from the same configs.
"""
from __future__ import annotations

import json
from importlib import resources

import torch
import transformers
from transformers import AutoConfig, PretrainedConfig

#: Hub id → the shipped config file (in ``medvl/models/configs/``, without ``.json``).
KNOWN_ARCHITECTURES: dict[str, str] = {
    "Salesforce/blip-image-captioning-base": "blip-image-captioning-base",
    "Salesforce/blip-vqa-base": "blip-vqa-base",
    "Salesforce/blip2-opt-2.7b": "blip2-opt-2.7b",
    "gpt2": "gpt2",
    "openlm-research/open_llama_3b": "open_llama_3b",
    "openlm-research/open_llama_7b": "open_llama_7b",
    "microsoft/resnet-50": "resnet-50",
}

#: Hub id → the transformers class the recipes build from it (a name, resolved in :func:`model_class`).
MODEL_CLASSES: dict[str, str] = {
    "Salesforce/blip-image-captioning-base": "BlipForConditionalGeneration",
    "Salesforce/blip-vqa-base": "BlipForQuestionAnswering",
    "Salesforce/blip2-opt-2.7b": "Blip2ForConditionalGeneration",
    "gpt2": "GPT2LMHeadModel",
    "openlm-research/open_llama_3b": "LlamaForCausalLM",
    "openlm-research/open_llama_7b": "LlamaForCausalLM",
    "microsoft/resnet-50": "ResNetModel",
}

CONFIG_PACKAGE = "medvl.models"
CONFIG_FOLDER = "configs"


def known_id(name_or_path: str) -> str:
    """The hub id that ``name_or_path`` names: the id itself or its last path component (``blip2-opt-2.7b``)."""
    if name_or_path in KNOWN_ARCHITECTURES:
        return name_or_path
    short = name_or_path.rstrip("/").rsplit("/", 1)[-1]
    for hub_id in KNOWN_ARCHITECTURES:
        if hub_id.rsplit("/", 1)[-1] == short:
            return hub_id
    raise ValueError(
        f"model.name_or_path: no shipped architecture for {name_or_path!r}; known: {', '.join(KNOWN_ARCHITECTURES)}"
    )


def config_dict(name_or_path: str) -> dict:
    """The shipped config of a known architecture as a plain dict (a fresh copy each call)."""
    file = resources.files(CONFIG_PACKAGE) / CONFIG_FOLDER / f"{KNOWN_ARCHITECTURES[known_id(name_or_path)]}.json"
    return json.loads(file.read_text())


def real_config(name_or_path: str) -> PretrainedConfig:
    """The published architecture of a known hub id (or its last path component), as a transformers config.

    Raises ``ValueError("model.name_or_path: …")`` naming the known ids for anything else.
    """
    values = config_dict(name_or_path)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    config.name_or_path = known_id(name_or_path)
    return config


def model_class(name_or_path: str) -> type[torch.nn.Module]:
    """The transformers class the recipes build for a known hub id."""
    return getattr(transformers, MODEL_CLASSES[known_id(name_or_path)])


def build_on_meta(config: PretrainedConfig, model_class: type[torch.nn.Module]) -> torch.nn.Module:
    """``model_class(config)`` on the meta device: parameters with shapes and dtypes but no storage.

    ``model_class`` may be a concrete class (``Blip2ForConditionalGeneration``) or an Auto class
    (``AutoModelForCausalLM``). The model cannot run a forward pass; it can be counted, wrapped by peft
    (adapters are built on meta too) and frozen or unfrozen.
    """
    with torch.device("meta"):
        if hasattr(model_class, "from_config"):  # the Auto* classes have no __init__ to call
            return model_class.from_config(config)
        return model_class(config)


def build_known_on_meta(name_or_path: str) -> torch.nn.Module:
    """The real architecture of a known hub id, on the meta device (see :func:`build_on_meta`)."""
    return build_on_meta(real_config(name_or_path), model_class(name_or_path))


def is_on_meta(model: torch.nn.Module) -> bool:
    """True when no parameter or buffer of ``model`` holds real storage."""
    tensors = [*model.parameters(), *model.buffers()]
    return all(tensor.device.type == "meta" for tensor in tensors)
