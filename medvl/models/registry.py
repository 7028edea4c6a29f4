"""``model.recipe`` → the :class:`~medvl.models.base.Recipe` that implements it."""
from __future__ import annotations

import importlib
import sys

from medvl.models.base import Recipe
from medvl.spec import JobSpec

RECIPES: dict[str, str] = {
    "blip_caption": "medvl.models.blip_caption:BlipCaptionRecipe",
    "blip2": "medvl.models.blip2:Blip2Recipe",
    "blip_dapt": "medvl.models.blip_dapt:BlipDaptRecipe",
    "blip_vqa": "medvl.models.blip_vqa:BlipVqaRecipe",
    "softprompt_llm": "medvl.models.softprompt_llm:SoftPromptRecipe",
}

#: Old recipe names that still work, each → (its recipe, the one line printed when it is used).
ALIASES: dict[str, tuple[str, str]] = {
    "blip2_lora": ("blip2", 'model.recipe: "blip2_lora" is deprecated, use "blip2" (same recipe; train.finetune '
                            'picks lora or full)'),
}
_warned: set[str] = set()


def recipe_name(name: str) -> str:
    """The recipe ``name`` selects, saying once per process when it is a deprecated alias."""
    if name in ALIASES:
        name, message = ALIASES[name][0], ALIASES[name][1]
        if message not in _warned:
            _warned.add(message)
            print(message, file=sys.stderr, flush=True)
    return name


def build_recipe(spec: JobSpec) -> Recipe:
    name = recipe_name(spec.model.recipe)
    if name not in RECIPES:
        raise ValueError(f"model.recipe: expected one of {', '.join(RECIPES)}, got {name!r}")
    module, _, cls = RECIPES[name].partition(":")
    return getattr(importlib.import_module(module), cls)(spec)
