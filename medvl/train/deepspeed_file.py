"""``train.deepspeed.config_file``: an expert's DeepSpeed JSON, merged over the config medvl derives.

The derived settings have one source of truth, ``train``: step planning (how many optimizer steps an epoch has, the
schedule's length), the loop's accumulation and the exported model all read the spec. A file that set the batch
size, the accumulation, the ZeRO stage or the precision would change what DeepSpeed does while the rest of medvl
kept the spec's values, so those keys are refused here, each with the spec field that sets it. What remains
(bucket sizes, communication overlap, activation partitioning, logging…) is merged as written.

The file is read once, on the driver, when the spec is parsed and when the train stage starts; its contents
travel to the workers with the job (a worker never opens the path, which may not exist on its node), and its
digest is part of what a resumed run must match (:func:`medvl.train.trainer.claim_run_folder`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from medvl.spec import SpecError

FIELD = "train.deepspeed.config_file"
# DeepSpeed key (dotted for nested sections) → the spec field that sets it instead.
DERIVED_KEYS = {
    "train_batch_size": "train.batch_size × train.grad_accum × workers",
    "train_micro_batch_size_per_gpu": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.max_grad_norm",
    "fp16": "train.precision",
    "bf16": "train.precision",
    "bfloat16": "train.precision",
    "amp": "train.precision",
    "torch_autocast": "train.precision",
    "optimizer": "train.lr and train.weight_decay: medvl passes torch AdamW",
    "scheduler": "train.warmup_ratio: medvl passes its warm-up + cosine schedule",
    "zero_optimization.stage": "train.deepspeed.stage",
    "zero_optimization.offload_optimizer": "train.deepspeed.offload_optimizer",
    "zero_optimization.offload_param": "train.deepspeed.offload_params",
}


def read_config_file(path: str) -> dict[str, Any]:
    """The file's settings; SpecError naming the field when it is no JSON object or sets a derived key."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SpecError(f"{FIELD}: expected a DeepSpeed JSON file, got {path!r} ({exc.strerror or exc})") from None
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"{FIELD}: expected a DeepSpeed JSON file, got {path!r} (not JSON: {exc})") from None
    if not isinstance(settings, dict):
        raise SpecError(f"{FIELD}: expected a JSON object of DeepSpeed settings, got a {type(settings).__name__} "
                        f"in {path!r}")
    derived = [key for key in DERIVED_KEYS if _has(settings, key)]
    if derived:
        named = "; ".join(f"{key} (set {DERIVED_KEYS[key]})" for key in derived)
        raise SpecError(f"{FIELD}: expected only settings medvl does not derive from the spec, got {named} "
                        f"in {path!r}")
    return settings


def config_file_digest(path: str) -> str:
    """SHA-256 of the file's bytes; "" when no file is set."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else ""


def _has(settings: dict, dotted: str) -> bool:
    node: Any = settings
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True
