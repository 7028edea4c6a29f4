"""Which model a serve stage loads: ``serve.checkpoint``, or the model of the spec's last train/tune stage.

``serve.checkpoint`` may name an HF model folder, a peft adapter folder (loaded on the base it records), a train
or tune stage's folder (its summary names the model: for a search, the best trial's), a tune ``best/`` folder,
or a Hugging Face Hub id. Where those live in a run folder is :mod:`medvl.runs`' business. A location that does not
exist is taken for a Hub id only when it cannot be a local path (``org/name`` whose ``org`` is no folder here) or
says so (``hf://org/name``): a mistyped local path fails naming itself instead of turning into a download.
Folders may also be on object storage (``s3://…``): each replica then loads a cached copy (:mod:`medvl.models.cache`).
"""
from __future__ import annotations

import re
from pathlib import Path

from medvl.models.registry import model_markers
from medvl.runs import find_model_folder, stage_model
from medvl.spec import JobSpec, SpecError
from medvl.storage import Location, is_remote

HUB_PREFIX = "hf://"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")  # huggingface_hub's repo id rule, in short


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
    if location.startswith(HUB_PREFIX):
        repo = location[len(HUB_PREFIX):]
        if not HUB_ID.fullmatch(repo):
            raise SpecError(f"serve.checkpoint: expected hf://<org>/<name> (a Hugging Face Hub id), got {location!r}")
        return repo
    if is_remote(location):  # a folder on object storage: its listing says what it holds
        found = find_model_folder(Location.of(location, endpoint_url), model_markers())
    else:
        path = Path(location).expanduser()
        if not path.exists():
            if _cannot_be_a_path(location):
                return location
            raise SpecError(f"serve.checkpoint: expected a model folder, got {location!r} (no such folder: "
                            f"{path.absolute()}); write hf://<org>/<name> for a Hugging Face Hub model")
        found = find_model_folder(Location.of(path), model_markers())
    if found is None:
        raise SpecError(f"serve.checkpoint: expected a model folder ({', '.join(model_markers())}) or a train or "
                        f"tune stage's folder, got {location!r}")
    return str(found)


def _cannot_be_a_path(location: str) -> bool:
    """``org/name`` shaped like a Hub id whose ``org`` is not a folder here (``runs/model`` is a missing path)."""
    return bool(HUB_ID.fullmatch(location)) and not Path(location.split("/")[0]).exists()
