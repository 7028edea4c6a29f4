"""The one list of recipes: ``model.recipe`` → a :class:`RecipeCard` (what the recipe accepts) and its class.

A card is plain data, so spec validation can check a recipe's options without importing torch, transformers or
the recipe's module: which ``train.finetune`` policies and presets it supports, which recipe-specific ``model.*``
options it reads (another recipe's option set away from its default is refused, naming the field), the task it
needs, the endpoint it serves and the file that marks a folder as one of its saved models. The class is imported
only when a stage builds the recipe (:func:`build_recipe`).

Adding a recipe: write its module (a :class:`~medvl.models.base.Recipe` subclass) and add one card below.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medvl.models.base import Recipe
    from medvl.spec import JobSpec

# ModelSpec fields every recipe reads; the other model.* fields belong to the recipes that list them in `options`.
COMMON_MODEL_FIELDS = frozenset({"recipe", "name_or_path", "preset", "dtype"})
LORA_OPTIONS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")


class RecipeOptionError(ValueError):
    """A spec asks a recipe for something it does not do; the message names the field (``field: …``)."""


@dataclass(frozen=True)
class RecipeCard:
    name: str
    implementation: str  # "module:Class"
    task: str  # "caption" (image → text) or "vqa" (image + question → answer)
    endpoint: str  # what the served model answers: POST /v1/<endpoint>
    finetune: tuple[str, ...]  # train.finetune policies, the first being the recipe's usual one
    options: tuple[str, ...] = ()  # recipe-specific ModelSpec fields it reads
    presets: tuple[str, ...] = ("", "tiny", "random")
    data_task: str = ""  # the data.task it needs ("" = either)
    lora_only: tuple[str, ...] = ()  # options that, set, need train.finetune: lora
    model_marker: str = "config.json"  # a file that marks a folder as this recipe's saved model
    prompted: bool = False  # generates after a text prompt (GenerationSettings.prompt): the zero_shot baseline

    def check(self, spec: JobSpec) -> None:
        """Raise :class:`RecipeOptionError` naming the first field this recipe cannot honour."""
        model, policy = spec.model, spec.train.finetune
        if policy not in self.finetune:
            raise RecipeOptionError(f"train.finetune: expected one of {', '.join(self.finetune)} for recipe "
                                    f"{self.name}, got {policy!r}")
        if model.preset not in self.presets:
            raise RecipeOptionError(f"model.preset: expected one of {', '.join(repr(p) for p in self.presets)} for "
                                    f"recipe {self.name}, got {model.preset!r}")
        if self.data_task and spec.data.task != self.data_task:
            raise RecipeOptionError(f"data.task: expected {self.data_task!r} for recipe {self.name}, "
                                    f"got {spec.data.task!r}")
        if "zero_shot" in spec.eval.baselines and not self.prompted:
            prompted = [card.name for card in RECIPES.values() if card.prompted]
            raise RecipeOptionError(f"eval.baselines: zero_shot needs a recipe that generates after a prompt "
                                    f"({', '.join(prompted)}), got recipe {self.name}")
        defaults = type(model)()
        for name in self.lora_only:
            if getattr(model, name) != getattr(defaults, name) and policy != "lora":
                raise RecipeOptionError(f"model.{name}: expected it unset with train.finetune {policy} for recipe "
                                        f"{self.name} (only LoRA trains beside such weights), got "
                                        f"{getattr(model, name)!r}")
        for f in fields(model):
            if f.name in COMMON_MODEL_FIELDS or f.name in self.options:
                continue
            value = getattr(model, f.name)
            if value != getattr(defaults, f.name):
                users = [card.name for card in RECIPES.values() if f.name in card.options]
                raise RecipeOptionError(f"model.{f.name}: recipe {self.name} does not read it (it is for "
                                        f"{', '.join(users) or 'no recipe'}); leave it unset, got {value!r}")


RECIPES: dict[str, RecipeCard] = {card.name: card for card in (
    RecipeCard("blip_caption", "medvl.models.blip_caption:BlipCaptionRecipe", task="caption", endpoint="caption",
               finetune=("full", "decoder", "encoder")),
    RecipeCard("blip2", "medvl.models.blip2:Blip2Recipe", task="caption", endpoint="report",
               finetune=("lora", "frozen_vision", "full"), options=(*LORA_OPTIONS, "load_in_8bit", "load_in_4bit"),
               lora_only=("load_in_8bit", "load_in_4bit"), prompted=True),
    RecipeCard("blip_dapt", "medvl.models.blip_dapt:BlipDaptRecipe", task="caption", endpoint="caption",
               finetune=("full", "frozen_vision"),
               options=("distill", "ema_tau_start", "ema_tau_end", "itc_queue_size")),
    RecipeCard("blip_vqa", "medvl.models.blip_vqa:BlipVqaRecipe", task="vqa", endpoint="vqa",
               finetune=("frozen_vision", "full"), data_task="vqa"),
    RecipeCard("softprompt_llm", "medvl.models.softprompt_llm:SoftPromptRecipe", task="caption", endpoint="report",
               finetune=("frozen_vision", "full"),
               options=(*LORA_OPTIONS, "lm_lora", "vision_name_or_path", "num_prefix_tokens"),
               model_marker="medvl_softprompt.json"),
)}

#: Old recipe names that still work: each → (its recipe, why it changed), said in one line when a spec uses it.
ALIASES: dict[str, tuple[str, str]] = {
    "blip2_lora": ("blip2", "same recipe; train.finetune picks lora or full"),
}
_warned: set[str] = set()


def canonical_name(name: str, warn: bool = True) -> str:
    """``name``, or the recipe an old name now refers to (saying so once per process)."""
    if name not in ALIASES:
        return name
    new, why = ALIASES[name]
    if warn and name not in _warned:
        _warned.add(name)
        print(f"warning: model.recipe: {name!r} is deprecated, use {new!r} ({why})", file=sys.stderr, flush=True)
    return new


def card_for(name: str) -> RecipeCard:
    """The card of ``model.recipe`` (aliases accepted). Raises RecipeOptionError naming the field."""
    card = RECIPES.get(canonical_name(name, warn=False))
    if card is None:
        raise RecipeOptionError(f"model.recipe: expected one of {', '.join(RECIPES)}, got {name!r}")
    return card


def build_recipe(spec: JobSpec) -> Recipe:
    card = card_for(canonical_name(spec.model.recipe))
    module, _, cls = card.implementation.partition(":")
    return getattr(importlib.import_module(module), cls)(spec)


def model_markers() -> tuple[str, ...]:
    """Files that mark a folder as a saved model of some recipe (HF config, peft adapter, recipe-specific)."""
    return tuple(dict.fromkeys(["config.json", "adapter_config.json", *(c.model_marker for c in RECIPES.values())]))
