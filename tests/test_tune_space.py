"""Search spaces in tune_spaces/ validate; malformed ones fail with the field named."""
from __future__ import annotations

from pathlib import Path

import pytest

from medvl.spec import SpecError
from medvl.tune.space import grid_size, load_space, parse_space, to_ray_tune

SPACES = sorted((Path(__file__).resolve().parents[1] / "tune_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_shipped_space_validates(path: Path):
    space = load_space(path)
    assert set(to_ray_tune(space)) == {d.field for d in space}


def test_published_blip2_grid_has_36_trials():
    space = load_space(next(p for p in SPACES if p.name == "blip2_lora.yaml"))
    assert grid_size(space) == 3 * 2 * 2 * 3
    assert {d.field: d.args for d in space}["model.lora_r"] == (4, 8, 16)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"train.lr": {"gaussian": [0, 1]}}, "space: train.lr: unknown distribution 'gaussian'"),
        ({"model.lora_r": {"grid": []}}, "space: model.lora_r.grid: expected a non-empty list"),
        ({"train.lr": {"uniform": [0.1, 0.01]}}, "space: train.lr.uniform: expected low < high, got [0.1, 0.01]"),
        ({"train.lr": {"loguniform": [0.0, 0.1]}}, "space: train.lr.loguniform: expected low > 0"),
        ({"model.lora_r": {"randint": [2, 8.5]}}, "space: model.lora_r.randint: expected integers"),
        ({"train.lrr": {"grid": [1]}}, "space: train.lrr: train has no field 'lrr'"),
        ({"optimizer.lr": {"grid": [1]}}, "space: optimizer.lr: expected a field of data, model, train or eval"),
        ({}, "space: expected a non-empty mapping"),
    ],
)
def test_malformed_space_names_the_field(raw, message):
    with pytest.raises(SpecError) as info:
        parse_space(raw)
    assert str(info.value).startswith(message), str(info.value)


def test_shipped_spaces_are_found_inside_the_package_from_any_directory(tmp_path, monkeypatch):
    """An installed medvl has no repository beside it: the shipped spaces are package data."""
    import medvl
    from medvl.tune.space import resolve_space_path

    monkeypatch.chdir(tmp_path)
    package = Path(medvl.__file__).parent
    for name in ("blip2_lora", "blip2_lora.yaml", "tune_spaces/blip2_lora.yaml"):
        found = resolve_space_path(name)
        assert found.is_relative_to(package / "tune" / "spaces"), found
