"""Gradient (activation) checkpointing for every recipe's model (``train.gradient_checkpointing``).

HF models checkpoint their repeated layers themselves (``activation_checkpointing_enable``); peft models pass it
to their base. medvl's composite models (the soft-prompt model, the DAPT model) implement
``enable_gradient_checkpointing()``: they switch it on in their HF towers and wrap their own submodules (the
mapper, the DAPT heads) in ``torch.utils.checkpoint`` with :func:`run_checkpointed`.

Always the non-reentrant variant: it needs no input that requires grad (a frozen embedding in front of LoRA
layers would otherwise cut the graph), works with ZeRO-3's parameter hooks, and replays the RNG state, so
dropout draws the same masks in the recompute and the loss is the same with and without checkpointing.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

NON_REENTRANT = {"use_reentrant": False}


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Switch checkpointing on for a recipe's training model (raises ValueError where it cannot be)."""
    if hasattr(model, "enable_gradient_checkpointing"):  # medvl's composite models
        model.enable_gradient_checkpointing()
        return
    enable_hf_checkpointing(model)


def enable_hf_checkpointing(model: torch.nn.Module) -> None:
    """An HF model's own checkpointing (of the base model when ``model`` is a peft wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"train.gradient_checkpointing: {type(base).__name__} does not support it")
    enable = getattr(base, "activation_checkpointing_enable", None)  # transformers ≥ 5.24's name
    if enable is not None:
        enable(activation_checkpointing_kwargs=dict(NON_REENTRANT))
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(NON_REENTRANT))


def run_checkpointed(module: torch.nn.Module, *args: Any, enabled: bool) -> Any:
    """``module(*args)``, its activations recomputed in backward when ``enabled`` and a graph is being built."""
    if enabled and module.training and torch.is_grad_enabled():
        return checkpoint(module, *args, **NON_REENTRANT)
    return module(*args)
