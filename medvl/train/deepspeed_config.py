"""The DeepSpeed config, derived from the job spec so that batch size, accumulation, clipping and precision
have one source of truth (``train.*``); ``train.deepspeed.config_file`` is merged over it for experts (the keys
those fields set are refused there: :mod:`medvl.train.deepspeed_file`).

The optimizer and scheduler are not in the config: the loop passes torch's AdamW and the same warm-up +
cosine schedule as the DDP path, so a run means the same thing under either strategy (and nothing compiles:
DeepSpeed's FusedAdam and CPU Adam build C++ extensions on first use).
"""
from __future__ import annotations

from typing import Any

import torch

from medvl.models.precision import training_precision
from medvl.spec import JobSpec
from medvl.train.deepspeed_file import read_config_file


def deepspeed_config(spec: JobSpec, world_size: int,
                     file_settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """``file_settings``: ``train.deepspeed.config_file``'s contents as the driver read them (workers get them with
    the job); None reads the file here."""
    train, settings = spec.train, spec.train.deepspeed
    zero: dict[str, Any] = {"stage": settings.stage, "overlap_comm": False, "contiguous_gradients": True}
    if settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if settings.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if settings.stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # export consolidates the fp32 shards instead
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW, see the module docstring
        "steps_per_print": 10**9,  # the loop logs progress itself
        "wall_clock_breakdown": False,
    }
    precision = training_precision(spec)
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}  # dynamic loss scaling
    if file_settings is None and settings.config_file:
        file_settings = read_config_file(settings.config_file)
    if file_settings:
        config = merged(config, file_settings)
    return config


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``, recursing into nested sections."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
