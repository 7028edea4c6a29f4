"""Which LoRA adapters a multiplexed deployment serves on one base (``serve.adapters``), resolved on the driver.

``serve.adapters`` lists adapter folders, or is ``["top:K"]``: the K best trials of the spec's tune stage, read
from its ``trial_models.json`` (every finished trial's best checkpoint, exported by the tune stage, best first).
All adapters must record the same base model: the replica loads that base once and swaps adapters on it.

Each adapter is plain data (it travels in the Serve config): ``name`` (what a request puts in ``"model"`` or the
``serve_multiplexed_model_id`` header: the trial id, or the folder's name), ``folder``, and what ``GET /v1/models``
shows (``config``: the searched values; ``metric`` / ``value``: the validation metric it reached).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from medvl.models.lora import adapter_base, is_adapter_folder
from medvl.runs import MODEL_DIR, RunLayout, TuneLayout
from medvl.spec import JobSpec, SpecError

TOP = re.compile(r"top:([1-9]\d*)")


def resolve_adapters(spec: JobSpec) -> list[dict]:
    """``serve.adapters`` as adapter records (see the module docstring); [] when the field is empty."""
    entries = spec.serve.adapters
    if not entries:
        return []
    top = TOP.fullmatch(entries[0]) if len(entries) == 1 else None
    adapters = _top_trials(spec, int(top.group(1))) if top else [_folder_adapter(e) for e in entries]
    names = [a["name"] for a in adapters]
    if len(set(names)) != len(names):
        raise SpecError(f"serve.adapters: expected adapters with distinct folder names, got {names}")
    bases = {adapter_base(a["folder"]) for a in adapters if not a["folder"].startswith("s3://")}
    if len(bases) > 1:
        raise SpecError(f"serve.adapters: expected adapters of one base model, got {sorted(bases)}")
    return adapters


def _folder_adapter(location: str) -> dict:
    if location.startswith("top:"):
        raise SpecError(f'serve.adapters: expected ["top:K"] alone or adapter folders, got {location!r} in a list')
    if location.startswith("s3://"):  # fetched into the replica's model cache (medvl.models.cache) when loaded
        parts = location.rstrip("/").split("/")
        name = parts[-2] if parts[-1] == MODEL_DIR else parts[-1]
        return {"name": name, "folder": location, "config": {}, "metric": "", "value": None}
    path = Path(location).expanduser().absolute()
    if not is_adapter_folder(path):
        raise SpecError(f"serve.adapters: expected a peft adapter folder (adapter_config.json), got {location!r}")
    name = path.parent.name if path.name == MODEL_DIR else path.name
    return {"name": name, "folder": str(path), "config": {}, "metric": "", "value": None}


def _top_trials(spec: JobSpec, count: int) -> list[dict]:
    tune_stages = [s.name for s in spec.stages if s.kind == "tune"]
    if not tune_stages:
        raise SpecError(f'serve.adapters: expected a tune stage in the spec for "top:{count}", got none')
    search = spec.for_stage(next(s for s in spec.stages if s.name == tune_stages[-1]))
    if search.train.finetune != "lora":
        raise SpecError(f'serve.adapters: "top:{count}" serves the LoRA adapters of a search, got stage '
                        f"{tune_stages[-1]!r} training train.finetune {search.train.finetune}")
    layout = TuneLayout(RunLayout.for_spec(spec).stage(tune_stages[-1]))
    if not layout.trial_models.is_file():
        raise SpecError(f'serve.adapters: "top:{count}" needs the finished search of stage {tune_stages[-1]!r} '
                        f"({layout.trial_models} is missing): run it first")
    trials = json.loads(layout.trial_models.read_text())[:count]
    return [{"name": t["trial_id"], "folder": t["model_dir"], "config": t["config"], "metric": t["metric"],
             "value": t["value"]} for t in trials]
