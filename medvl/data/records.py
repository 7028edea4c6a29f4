"""The one record type every reader produces and every shard stores.

A dataset reader turns a published layout into a stream of :class:`Record` (good rows),
:class:`Skipped` (rows that cannot be used, or that a setting filters out, with the reason) and
:class:`Repaired` (a note that the next record's text was repaired, e.g. undecodable bytes replaced).
``medvl prepare`` assigns splits, checks that the image decodes, counts every skip, filter and repair in
the manifest, and writes the records into Parquet shards whose columns are exactly :data:`SHARD_COLUMNS`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Union

SPLITS = ("train", "val", "test")
# A dataset's own training split when it has no validation split (VQA-RAD: train and test only): prepare
# carves val out of it by group, with data.split_fractions' train:val ratio.
TRAIN_OR_VAL = "train|val"
# Skip reasons that are a setting's choice (data.language…), not a problem: counted as "filtered", never warned.
FILTER_REASONS = ("other_language", "not_frontal")


@dataclass
class Record:
    """One image with its target text (caption or report) and/or one question-answer pair.

    ``group_id`` is what splits are grouped by (the patient, or the study where there is no
    patient id), so that no patient appears in two splits. ``split`` is the dataset's own split
    when it has one ("train" / "val" / "test"), otherwise "" and ``prepare`` assigns one.
    """

    id: str
    group_id: str
    image: bytes  # encoded image file bytes (PNG, JPEG or DICOM) exactly as read from the source
    text: str = ""  # caption / report target; "" for pure VQA rows
    question: str = ""
    answer: str = ""
    answer_type: str = ""  # "closed" | "open" | "" (no QA)
    split: str = ""  # or TRAIN_OR_VAL
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable extras (modality, view, cuis…)

    def to_row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "group_id": self.group_id,
            "split": self.split,
            "image": self.image,
            "text": self.text,
            "question": self.question,
            "answer": self.answer,
            "answer_type": self.answer_type,
            "meta": json.dumps(self.meta, sort_keys=True),
        }


@dataclass(frozen=True)
class Skipped:
    """A source row that was not turned into a record, and why (a short snake_case reason)."""

    id: str
    reason: str  # e.g. "missing_image", "unreadable_image", "empty_target", "malformed_row", "other_language"


@dataclass(frozen=True)
class Repaired:
    """The record that follows (same ``id``) was kept after a repair, e.g. "undecodable_text": bytes that were not
    UTF-8 replaced by U+FFFD."""

    id: str
    reason: str


ReaderItem = Union[Record, Skipped, Repaired]
ReaderOutput = Iterator[ReaderItem]

SHARD_COLUMNS = ("id", "group_id", "split", "image", "text", "question", "answer", "answer_type", "meta")
