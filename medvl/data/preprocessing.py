"""The model-agnostic half of turning shard rows into model inputs, run inside Ray Data's ``map_batches``.

:class:`ImageTextPreprocessor` decodes and resizes the images (dropping and counting rows whose image does not
decode, so one corrupt file costs one sample, not the run: see :mod:`medvl.data.skips`), runs the image
processor and hands the texts to :meth:`ImageTextPreprocessor.encode`, which each recipe defines: the token
layout (``[bos] text [sep]``, BLIP-2's image-token prefix…) is the model's business, not the data's.

:class:`FolderPreprocessor` is the same work without torch or transformers, for model folders whose
preprocessing it can replay exactly (a ``tokenizer.json`` and an image processor that resizes to a fixed size,
rescales and normalises): the ``tokenizers`` library, PIL and numpy only. Ray Data's preprocessing actors are
new processes every epoch; built from the transformers classes they imported torch and transformers (with the
recipe's model code) before their first row, ~10 s of an epoch's ingest on two CPUs, where these imports take
a fraction of a second. A recipe opts in (``Recipe.preprocessor_factory``) where its token layout is this
class's ``[start] tokens [end]``; the tests check it against the recipe's transformers-based preprocessor.
"""
from __future__ import annotations

import json
from pathlib import Path
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


TOKENIZER_FILE = "tokenizer.json"  # transformers' names for a fast tokenizer and an image processor's settings
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
# Image processors whose work is resize (to a fixed height × width), rescale and normalise, and nothing else.
PLAIN_IMAGE_PROCESSORS = ("BlipImageProcessor", "BlipImageProcessorPil", "BlipImageProcessorFast")


class UnsupportedFolder(ValueError):
    """A model folder whose preprocessing :class:`FolderPreprocessor` cannot replay exactly."""


class PilImageProcessor:
    """Resize (PIL, the folder's resampling filter), rescale and normalise to channel-first float32, as the
    transformers PIL image processor of :data:`PLAIN_IMAGE_PROCESSORS` does, in numpy over the whole batch."""

    def __init__(self, settings: dict[str, Any]):
        kind = settings.get("image_processor_type", "")
        if kind not in PLAIN_IMAGE_PROCESSORS or settings.get("do_center_crop") or settings.get("do_pad"):
            raise UnsupportedFolder(f"image processor {kind or '(unnamed)'} with these settings is not replayed here")
        self.resize = settings.get("do_resize", True)
        self.resample = int(settings.get("resample", 3))  # PIL's BICUBIC, BLIP's default
        self.scale = settings.get("rescale_factor", 1 / 255) if settings.get("do_rescale", True) else None
        normalize = settings.get("do_normalize", True)
        self.mean = np.asarray(settings["image_mean"], np.float32) if normalize else None
        self.std = np.asarray(settings["image_std"], np.float32) if normalize else None

    def __call__(self, images: list, size: dict[str, int], return_tensors: str = "np") -> dict[str, np.ndarray]:
        target = (size["width"], size["height"])
        if not self.resize and any(image.size != target for image in images):
            raise UnsupportedFolder("images of different sizes and no resize")
        pixels = np.stack([np.asarray(image.resize(target, resample=self.resample) if self.resize else image,
                                      dtype=np.uint8) for image in images])  # (n, h, w, 3)
        values = pixels.astype(np.float64) * self.scale if self.scale is not None else pixels
        values = values.astype(np.float32)  # transformers rescales in float64, then casts
        if self.mean is not None:
            values = (values - self.mean) / self.std
        return {"pixel_values": np.ascontiguousarray(values.transpose(0, 3, 1, 2))}


class FolderPreprocessor(ImageTextPreprocessor):
    """Rows → ``pixel_values`` and ``[start] tokens [end]`` padded with ``pad``, from a model folder's
    ``tokenizer.json`` and ``preprocessor_config.json``, importing neither torch nor transformers.

    Raises :class:`UnsupportedFolder` when the folder lacks those files or its image processor does more than
    :class:`PilImageProcessor` replays; the caller then uses the recipe's own preprocessor.
    """

    def __init__(self, model_dir: str, image_size: int, max_text_length: int, start: int, end: int, pad: int):
        folder = Path(model_dir)
        tokenizer_file, image_file = folder / TOKENIZER_FILE, folder / IMAGE_PROCESSOR_FILE
        if not (tokenizer_file.is_file() and image_file.is_file()):
            raise UnsupportedFolder(f"{model_dir}: no {TOKENIZER_FILE} or {IMAGE_PROCESSOR_FILE}")
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        tokenizer.no_truncation()  # encode truncates itself, after dropping the special tokens
        tokenizer.no_padding()
        image_processor = PilImageProcessor(json.loads(image_file.read_text()))
        super().__init__(tokenizer, image_processor, image_size, max_text_length)
        self.start, self.end, self.pad = start, end, pad

    def encode(self, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
        pieces = [e.ids[: length - 2] for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
        return pad_sequences([[self.start, *ids, self.end] for ids in pieces], length, self.pad)
