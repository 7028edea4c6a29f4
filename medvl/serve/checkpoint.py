"""Which model a serve stage loads: ``serve.checkpoint``, or the model of the spec's last train/tune stage.

``serve.checkpoint`` may name an HF model folder, a peft adapter folder (loaded on the base it records), a train
or tune stage's folder (its summary names the model: for a search, the best trial's), a tune ``best/`` folder,
or a hub id. Folders may be local or on object storage (``s3://…``): each replica then loads a cached copy
(:mod:`medvl.models.cache`). Where those live in a run folder is :mod:`medvl.runs`' business.
"""
from __future__ import annotations

from pathlib import Path

from medvl.models.registry import model_markers
from medvl.runs import find_model_folder, stage_model
from medvl.spec import JobSpec, SpecError
from medvl.storage import Location, is_remote


def resolve_checkpoint(spec: JobSpec, last_train: str | None) -> str:
    """The model folder (absolute) or hub id to serve. Raises SpecError naming ``serve.checkpoint``."""
    if spec.serve.checkpoint:
        return model_location(spec.serve.checkpoint, spec.data.endpoint_url)
    if last_train is None:
        raise SpecError('serve.checkpoint: expected a model folder (the spec has no train or tune stage to take '
                        'the model from), got ""')
    try:
        return stage_model(spec.output_dir, last_train, spec.data.endpoint_url)  # absolute path or URL
    except FileNotFoundError as missing:
        raise SpecError(f'serve.checkpoint: expected a model folder, got "" and stage {last_train!r} has not '
                        f"written a model yet ({missing}): run it first") from None


def model_location(location: str, endpoint_url: str = "") -> str:
    if not is_remote(location) and not Path(location).exists():
        if _looks_like_hub_id(location):
            return location
        raise SpecError(f"serve.checkpoint: expected a model folder or hub id, got {location!r} (no such folder)")
    found = find_model_folder(Location.of(location, endpoint_url), model_markers())
    if found is None:
        raise SpecError(f"serve.checkpoint: expected a model folder ({', '.join(model_markers())}) or a train or "
                        f"tune stage's folder, got {location!r}")
    return str(found)


def _looks_like_hub_id(location: str) -> bool:
    return location.count("/") == 1 and not location.startswith((".", "/", "~"))
