"""Which model a serve stage loads: ``serve.checkpoint``, or the model of the spec's last train/tune stage.

``serve.checkpoint`` may name an HF model folder, a peft adapter folder (loaded on the base it records), a train
or tune stage's folder (its summary names the model: for a search, the best trial's), a tune ``best/`` folder,
or a hub id. Where those live in a run folder is :mod:`medvl.runs`' business.
"""
from __future__ import annotations

from pathlib import Path

from medvl.models.registry import model_markers
from medvl.runs import find_model_folder, stage_model
from medvl.spec import JobSpec, SpecError


def resolve_checkpoint(spec: JobSpec, last_train: str | None) -> str:
    """The model folder (absolute) or hub id to serve. Raises SpecError naming ``serve.checkpoint``."""
    if spec.serve.checkpoint:
        return model_location(spec.serve.checkpoint)
    if last_train is None:
        raise SpecError('serve.checkpoint: expected a model folder (the spec has no train or tune stage to take '
                        'the model from), got ""')
    try:
        return str(Path(stage_model(spec.output_dir, last_train)).absolute())
    except FileNotFoundError as missing:
        raise SpecError(f'serve.checkpoint: expected a model folder, got "" and stage {last_train!r} has not '
                        f"written a model yet ({missing}): run it first") from None


def model_location(location: str) -> str:
    path = Path(location)
    if not path.exists():
        if _looks_like_hub_id(location):
            return location
        raise SpecError(f"serve.checkpoint: expected a model folder or hub id, got {location!r} (no such folder)")
    found = find_model_folder(path, model_markers())
    if found is None:
        raise SpecError(f"serve.checkpoint: expected a model folder ({', '.join(model_markers())}) or a train or "
                        f"tune stage's folder, got {location!r}")
    return str(found)


def _looks_like_hub_id(location: str) -> bool:
    return location.count("/") == 1 and not location.startswith((".", "/", "~"))
