"""The model-agnostic half of turning shard rows into model inputs, run inside Ray Data's ``map_batches``.

:class:`ImageTextPreprocessor` decodes and resizes the images (dropping and counting rows whose image does not
decode, so one corrupt file costs one sample, not the run: see :mod:`medvl.data.skips`), runs the image
processor and hands the texts to :meth:`ImageTextPreprocessor.encode`, which each recipe defines: the token
layout (``[bos] text [sep]``, BLIP-2's image-token prefix…) is the model's business, not the data's.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from medvl.data.images import UnreadableImage, decode_image
from medvl.data.skips import report_skipped

Batch = dict[str, np.ndarray]
PASSTHROUGH_COLUMNS = ("id", "text", "answer", "answer_type", "question", "meta")


class ImageTextPreprocessor:
    """A picklable ``map_batches`` callable: images → ``pixel_values``, texts → ``input_ids`` / ``attention_mask``.

    ``image_processor`` is any HF-style image processor (called with ``size=`` and ``return_tensors="np"``);
    ``tokenizer`` is kept for subclasses' :meth:`encode`.
    """

    def __init__(self, tokenizer: Any, image_processor: Any, image_size: int, max_text_length: int):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.size = {"height": image_size, "width": image_size}
        self.max_text_length = max_text_length

    def encode(self, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, both (len(texts), length)."""
        raise NotImplementedError

    def __call__(self, batch: Batch) -> Batch:
        images, keep = [], []
        for i, data in enumerate(batch["image"]):
            try:
                images.append(decode_image(bytes(data)))
                keep.append(i)
            except UnreadableImage:
                pass
        if len(keep) < len(batch["image"]):
            report_skipped("unreadable_image", len(batch["image"]) - len(keep))
        rows = {key: np.asarray(values)[keep] for key, values in batch.items() if key != "image"}
        out: Batch = {name: rows[name] for name in PASSTHROUGH_COLUMNS}
        if not keep:
            out["pixel_values"] = np.zeros((0, 3, self.size["height"], self.size["width"]), np.float32)
            out.update({k: np.zeros((0, self.max_text_length), np.int64) for k in ("input_ids", "attention_mask")})
            return out
        out["pixel_values"] = np.asarray(
            self.image_processor(images, size=self.size, return_tensors="np")["pixel_values"], dtype=np.float32
        )
        out["input_ids"], out["attention_mask"] = self.encode(list(rows["text"]), self.max_text_length)
        return out


def pad_sequences(sequences: list[list[int]], length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token sequences to ``length``: ids and attention mask (1 on real tokens)."""
    ids = np.full((len(sequences), length), pad, dtype=np.int64)
    mask = np.zeros((len(sequences), length), dtype=np.int64)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
        mask[row, : len(sequence)] = 1
    return ids, mask
