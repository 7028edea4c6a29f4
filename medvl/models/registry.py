"""``model.recipe`` → the :class:`~medvl.models.base.Recipe` that implements it."""
from __future__ import annotations

import importlib

from medvl.models.base import Recipe
from medvl.spec import JobSpec

RECIPES: dict[str, str] = {
    "blip_caption": "medvl.models.blip_caption:BlipCaptionRecipe",
    "blip2_lora": "medvl.models.blip2_lora:Blip2LoraRecipe",
    "blip_dapt": "medvl.models.blip_dapt:BlipDaptRecipe",
    "blip_vqa": "medvl.models.blip_vqa:BlipVqaRecipe",
    "softprompt_llm": "medvl.models.softprompt_llm:SoftPromptRecipe",
}


def build_recipe(spec: JobSpec) -> Recipe:
    name = spec.model.recipe
    if name not in RECIPES:
        raise ValueError(f"model.recipe: expected one of {', '.join(RECIPES)}, got {name!r}")
    module, _, cls = RECIPES[name].partition(":")
    return getattr(importlib.import_module(module), cls)(spec)
