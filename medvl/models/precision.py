"""Precision of the weights (``model.dtype``) and of a training step's arithmetic (``train.precision``).

Two settings, one rule that ties them:

* ``model.dtype`` is the dtype weights are loaded in, for training, eval and serving alike. ``auto`` is bfloat16
  on a GPU that has it and float32 elsewhere (CPU bf16 matmuls are slower than fp32 on most x86 cores). Loading
  a 7B LM in bf16 costs 14 GB instead of 28 GB before anything trains.
* ``train.precision`` is what the forward computes in. ``auto`` follows a low-precision ``model.dtype`` (weights
  in bf16 compute in bf16), else bf16 on a capable GPU, else fp32. The spec refuses a precision that contradicts
  low-precision weights (bf16 weights with ``fp32``).

What stays in low precision: frozen weights (they never see an optimizer). Trainable ones keep fp32 optimizer
state: under DDP they are cast back to fp32 after loading (:func:`keep_trainable_in_fp32`; autocast bridges
the two dtypes in the forward), under DeepSpeed its optimizer keeps an fp32 master copy of the bf16/fp16
weights. peft adapters are created in fp32 on a bf16 base already (``autocast_adapter_dtype``). In float16, HF
keeps some modules in fp32 (``_keep_in_fp32_modules``: BLIP-2's Q-Former and query tokens); in bfloat16 it
does not (only ``_keep_in_fp32_modules_strict`` would, which none of the recipes' models set).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

import torch

from medvl.spec import JobSpec

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LOW_PRECISION_NAMES = {"bfloat16": "bf16", "float16": "fp16"}


def gpu_has_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def weight_dtype(spec: JobSpec) -> torch.dtype:
    """The dtype ``from_pretrained`` loads weights in on this machine (``model.dtype`` resolved)."""
    name = spec.model.dtype
    if name != "auto":
        return DTYPES[name]
    if torch.cuda.is_available() and spec.train.precision == "fp16":
        return torch.float16
    return torch.bfloat16 if gpu_has_bf16() and spec.train.precision != "fp32" else torch.float32


def storage_dtype(spec: JobSpec) -> torch.dtype:
    """The dtype a random-weight start folder is written in, on the driver: ``model.dtype``; for ``auto``, bf16
    when the workers train on GPUs (the driver may have none) and fp32 otherwise."""
    if spec.model.dtype != "auto":
        return DTYPES[spec.model.dtype]
    return torch.bfloat16 if spec.train.use_gpu and spec.train.precision in ("auto", "bf16") else torch.float32


def training_precision(spec: JobSpec) -> str:
    """``bf16``, ``fp16`` or ``fp32``: what a training step computes in (``train.precision`` resolved)."""
    precision = spec.train.precision
    if precision != "auto":
        return precision
    if spec.model.dtype in LOW_PRECISION_NAMES:
        return LOW_PRECISION_NAMES[spec.model.dtype]
    return "bf16" if gpu_has_bf16() else "fp32"


def autocast(precision: str, device_type: str) -> ContextManager:
    """Autocast to ``precision`` on ``device_type`` (nothing for fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type, dtype=PRECISION_DTYPES[precision])


def keep_trainable_in_fp32(model: torch.nn.Module) -> int:
    """Cast every trainable parameter stored in a low precision to fp32 in place; returns how many were cast."""
    cast = 0
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.is_floating_point() and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
            cast += 1
    return cast


def dtype_census(model: torch.nn.Module) -> dict[tuple[bool, torch.dtype], int]:
    """Parameter counts by (trainable, dtype): what a reader checks to see what stayed in low precision."""
    census: dict[tuple[bool, torch.dtype], int] = {}
    for parameter in model.parameters():
        key = (parameter.requires_grad, parameter.dtype)
        census[key] = census.get(key, 0) + parameter.numel()
    return census
