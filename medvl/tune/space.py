"""Search spaces as data: ``tune_spaces/*.yaml`` parsed, validated, and turned into Ray Tune domains.

A space maps dotted spec fields to a distribution::

    model.lora_r: {grid: [4, 8, 16]}
    train.lr: {loguniform: [1.0e-5, 1.0e-3]}
    model.lora_dropout: {choice: [0.0, 0.1]}

Distributions: ``grid`` (every value, crossed with the other grids), ``choice``, ``uniform``,
``loguniform``, ``randint`` (low inclusive, high exclusive, as in Ray Tune). Validation fails with the field
named, before Ray starts, like the job spec's.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from medvl.spec import JobSpec, SpecError

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")


@dataclasses.dataclass(frozen=True)
class Dimension:
    field: str  # dotted spec field, e.g. "train.lr"
    kind: str  # one of DISTRIBUTIONS
    args: tuple  # values (grid/choice) or (low, high)


def load_space(path: str | Path) -> list[Dimension]:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse_space(raw, where=path.name)


def parse_space(raw: Any, where: str = "space") -> list[Dimension]:
    if not isinstance(raw, dict) or not raw:
        raise SpecError(f"{where}: expected a non-empty mapping of spec fields to distributions")
    return [_dimension(str(field), value, f"{where}: {field}") for field, value in raw.items()]


def _dimension(field: str, value: Any, where: str) -> Dimension:
    _check_field_exists(field, where)
    if not isinstance(value, dict) or len(value) != 1:
        raise SpecError(f"{where}: expected one distribution, e.g. {{grid: [1, 2]}}, got {value!r}")
    ((kind, args),) = value.items()
    if kind not in DISTRIBUTIONS:
        raise SpecError(f"{where}: unknown distribution {kind!r} (expected one of {', '.join(DISTRIBUTIONS)})")
    if not isinstance(args, list) or not args:
        raise SpecError(f"{where}.{kind}: expected a non-empty list, got {args!r}")
    if kind in ("uniform", "loguniform", "randint"):
        if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise SpecError(f"{where}.{kind}: expected [low, high] numbers, got {args!r}")
        low, high = args
        if low >= high:
            raise SpecError(f"{where}.{kind}: expected low < high, got [{low}, {high}]")
        if kind == "loguniform" and low <= 0:
            raise SpecError(f"{where}.{kind}: expected low > 0 for a log scale, got {low}")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise SpecError(f"{where}.{kind}: expected integers, got {args!r}")
    return Dimension(field, kind, tuple(args))


def _check_field_exists(field: str, where: str) -> None:
    section, _, name = field.partition(".")
    section_types = typing.get_type_hints(JobSpec)
    if section not in ("data", "model", "train", "eval"):
        raise SpecError(f"{where}: expected a field of data, model, train or eval, got {field!r}")
    if name not in {f.name for f in dataclasses.fields(section_types[section])}:
        raise SpecError(f"{where}: {section} has no field {name!r}")


SHIPPED_SPACES = Path(__file__).parent / "spaces"  # package data; the repository's tune_spaces/ links here


def resolve_space_path(text: str) -> Path:
    """``tune.space`` as a file: a path (relative to the working directory), else a shipped space by name
    (``blip2_lora``, ``blip2_lora.yaml`` or ``tune_spaces/blip2_lora.yaml``, wherever medvl is installed)."""
    path = Path(text).expanduser()
    shipped = path.relative_to("tune_spaces") if path.parts[:1] == ("tune_spaces",) else path
    candidates = [path] if path.is_absolute() else [
        path, SHIPPED_SPACES / shipped, SHIPPED_SPACES / f"{text}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.absolute()
    raise SpecError(f'tune.space: expected a search space file (a path or one of {SHIPPED_SPACES}), got "{text}"')


def check_space_for(text: str, search_alg: str) -> list[Dimension]:
    """Load ``tune.space`` and check it suits ``tune.search_alg``; errors name tune.space and the bad field."""
    try:
        space = load_space(resolve_space_path(text))
    except SpecError as exc:
        message = str(exc)
        raise SpecError(message if message.startswith("tune.space") else f"tune.space: {message}") from None
    sampled = [d.field for d in space if d.kind != "grid"]
    if search_alg == "grid" and sampled:
        raise SpecError(f'tune.search_alg: expected "random" for a space that samples ({", ".join(sampled)}), '
                        f'got "grid"')
    gridded = [d.field for d in space if d.kind == "grid"]
    if search_alg == "optuna" and gridded:
        raise SpecError(f'tune.search_alg: expected "grid" or "random" for a space with grids '
                        f'({", ".join(gridded)}), got "optuna"')
    return space


def to_ray_tune(space: list[Dimension]) -> dict[str, Any]:
    """The ``param_space`` for ``tune.Tuner``."""
    from ray import tune

    build = {
        "grid": lambda a: tune.grid_search(list(a)),
        "choice": lambda a: tune.choice(list(a)),
        "uniform": lambda a: tune.uniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "randint": lambda a: tune.randint(*a),
    }
    return {d.field: build[d.kind](d.args) for d in space}


def grid_size(space: list[Dimension]) -> int:
    size = 1
    for dimension in space:
        if dimension.kind == "grid":
            size *= len(dimension.args)
    return size
