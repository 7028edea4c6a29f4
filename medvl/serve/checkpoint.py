"""Which model a serve stage loads: ``serve.checkpoint``, or the model of the spec's last train/tune stage.

``serve.checkpoint`` may name an HF model folder, a peft adapter folder (loaded on the base it records), a train
or tune stage's folder (its ``train_summary.json`` names the model: for a search, the best trial's), a tune
``best/`` folder, or a hub id.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from medvl.spec import JobSpec, SpecError
from medvl.stages import train_summary

SUMMARY = "train_summary.json"
MODEL_FILES = ("config.json", "adapter_config.json", "medvl_softprompt.json")  # HF, peft, soft-prompt recipe
HUB_PREFIX = "hf://"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")  # huggingface_hub's repo id rule, in short


def resolve_checkpoint(spec: JobSpec, last_train: str | None) -> str:
    """The model folder (absolute) or hub id to serve. Raises SpecError naming ``serve.checkpoint``."""
    if spec.serve.checkpoint:
        return model_location(spec.serve.checkpoint)
    if last_train is None:
        raise SpecError('serve.checkpoint: expected a model folder (the spec has no train or tune stage to take '
                        'the model from), got ""')
    try:
        summary = train_summary(spec, last_train)
    except FileNotFoundError as missing:
        raise SpecError(f'serve.checkpoint: expected a model folder, got "" and stage {last_train!r} has not '
                        f"written a model yet ({missing}): run it first") from None
    return str(Path(summary["model_dir"]).absolute())


def model_stage_before(spec: JobSpec, stage_name: str) -> str | None:
    """The last train or tune stage listed before ``stage_name``: the one whose model that stage serves."""
    last = None
    for stage in spec.stages:
        if stage.name == stage_name:
            return last
        if stage.kind in ("train", "tune"):
            last = stage.name
    raise ValueError(f"no stage named {stage_name!r}")


def model_location(location: str) -> str:
    if location.startswith(HUB_PREFIX):
        repo = location[len(HUB_PREFIX):]
        if not HUB_ID.fullmatch(repo):
            raise SpecError(f"serve.checkpoint: expected hf://<org>/<name> (a Hugging Face Hub id), got {location!r}")
        return repo
    path = Path(location).expanduser()
    if not path.exists():
        if _cannot_be_a_path(location):
            return location
        raise SpecError(f"serve.checkpoint: expected a model folder, got {location!r} (no such folder: "
                        f"{path.absolute()}); write hf://<org>/<name> for a Hugging Face Hub model")
    if (path / SUMMARY).is_file():  # a train or tune stage's folder
        return str(Path(json.loads((path / SUMMARY).read_text())["model_dir"]).absolute())
    for candidate in (path, path / "model", path / "best" / "model"):
        if any((candidate / name).is_file() for name in MODEL_FILES):
            return str(candidate.absolute())
    raise SpecError(f"serve.checkpoint: expected a model folder (config.json or adapter_config.json), a train or "
                    f"tune stage's folder ({SUMMARY}), got {location!r}")


def _cannot_be_a_path(location: str) -> bool:
    """``org/name`` shaped like a Hub id whose ``org`` is not a folder here (``runs/model`` is a missing path)."""
    return bool(HUB_ID.fullmatch(location)) and not Path(location.split("/")[0]).exists()
