"""Where BLIP's text decoder looked: its cross-attention on the image patches, as one map per text.

Each decoder layer cross-attends from every text position to ``[CLS] + patches`` of the vision encoder. The map
for a text is that attention averaged over heads, layers and the text's real (unpadded) positions, with the CLS
column dropped and the rest renormalised to sum to 1, laid out as the patch grid. Averages of raw attention are a
coarse guide to grounding, not an explanation of the output; they are meant for eyeballing a few samples.
"""
from __future__ import annotations

import math

import numpy as np
import torch


@torch.no_grad()
def decoder_cross_attention(vision_model: torch.nn.Module, text_decoder: torch.nn.Module, pixel_values: torch.Tensor,
                            input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
    """(B, rows, cols) maps, each summing to 1, for texts already tokenised as ``[bos] tokens [sep]``."""
    resized = pixel_values.shape[-1] != vision_model.config.image_size  # e.g. a 384 px checkpoint run at 224
    image_embeds = vision_model(pixel_values=pixel_values, interpolate_pos_encoding=resized).last_hidden_state
    output = text_decoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                          output_attentions=True, return_dict=True)
    if not output.cross_attentions:
        raise RuntimeError("the text decoder returned no cross-attentions: load it with attn_implementation='eager'")
    per_layer = torch.stack(output.cross_attentions)  # (layers, B, heads, T, 1 + patches)
    weights = attention_mask.to(per_layer.dtype)[:, :, None]  # (B, T, 1)
    on_keys = per_layer.mean(dim=(0, 2))  # (B, T, 1 + patches)
    averaged = (on_keys * weights).sum(1) / weights.sum(1)  # (B, 1 + patches)
    patches = averaged[:, 1:]
    patches = patches / patches.sum(-1, keepdim=True)
    side = math.isqrt(patches.shape[-1])
    if side * side != patches.shape[-1]:
        raise ValueError(f"expected a square patch grid, got {patches.shape[-1]} patches")
    return patches.reshape(-1, side, side).double().numpy()
