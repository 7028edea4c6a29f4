"""Copying a ``save_pretrained`` folder's weights into a live model (resuming a full fine-tune under DDP).

Large models are saved in several safetensors shards (``model-00001-of-00004.safetensors`` + an index), so a
reader of ``model.safetensors`` alone misses them: read every file, one at a time (peak memory: one shard).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def load_full_weights(model: torch.nn.Module, folder: Path) -> None:
    """Copy every weight saved in ``folder`` (one safetensors file or several shards) into ``model``."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"checkpoint {folder} has no *.safetensors weights")
    for file in files:
        result = model.load_state_dict(load_file(file), strict=False)
        if result.unexpected_keys:  # missing keys: other shards' weights, or tied ones HF saves once
            raise RuntimeError(f"checkpoint {file} does not match the model: {result.unexpected_keys[:5]}")
