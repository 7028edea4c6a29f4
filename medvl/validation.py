"""The checks a parsed spec still needs before Ray starts: its recipe's options, and the files it names.

Parsing (:mod:`medvl.spec`) is pure: types, ranges and cross-field rules, no file system and no other medvl
module. This step adds what parsing cannot know: whether each stage's recipe supports the options it is given
(:meth:`medvl.models.registry.RecipeCard.check`, torch-free), and whether ``tune.space`` and
``train.deepspeed.config_file`` exist and parse (and that the latter sets no key the spec derives). ``medvl validate`` and every command call
:func:`load_valid_spec`; a replica or a Tune trial rebuilding a spec from an already validated one only parses.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from medvl.models.registry import RecipeOptionError, canonical_name, card_for
from medvl.spec import JobSpec, SpecError, load_spec, parse_spec

RECIPE_STAGES = ("train", "eval", "tune", "serve")  # the stage kinds that build the recipe


def load_valid_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Read, parse and validate a spec file; raises SpecError with one line naming the field."""
    return validate(load_spec(path, overrides))


def validate(spec: JobSpec) -> JobSpec:
    """``spec`` checked against its recipes and the file system, with deprecated recipe names replaced."""
    spec = _with_current_recipe_names(spec)
    for stage in spec.stages:
        if stage.kind not in RECIPE_STAGES:
            continue
        stage_spec = spec.for_stage(stage)
        try:
            card_for(stage_spec.model.recipe).check(stage_spec)
        except RecipeOptionError as exc:
            raise SpecError(f"stages.{stage.name}: {exc}" if stage.set else str(exc)) from None
    _check_environment(spec)
    return spec


def _with_current_recipe_names(spec: JobSpec) -> JobSpec:
    raw = dataclasses.asdict(spec)
    raw["model"]["recipe"] = canonical_name(spec.model.recipe)
    for stage in raw["stages"]:
        if "model.recipe" in stage["set"]:
            stage["set"]["model.recipe"] = canonical_name(stage["set"]["model.recipe"])
    return parse_spec(raw) if raw != dataclasses.asdict(spec) else spec


def _check_environment(spec: JobSpec) -> None:
    if spec.tune.search_alg == "optuna":
        import importlib.util

        if importlib.util.find_spec("optuna") is None:
            raise SpecError('tune.search_alg: expected "grid" or "random" (the optuna package is not installed), '
                            'got "optuna"')
    config_file = spec.train.deepspeed.config_file
    if config_file and not Path(config_file).is_file():
        raise SpecError(f"train.deepspeed.config_file: expected a DeepSpeed JSON file, got {config_file!r} "
                        "(no such file)")
    if config_file:
        from medvl.train.deepspeed_file import read_config_file

        read_config_file(config_file)  # refuses keys the spec derives (batch, accumulation, precision…)
    if spec.tune.space:
        from medvl.tune.space import check_space_for

        check_space_for(spec.tune.space, spec.tune.search_alg)
