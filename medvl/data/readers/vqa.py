"""VQA-RAD and SLAKE: radiology images with question-answer pairs, one record per question.

VQA-RAD (Lau et al., Sci Data 2018, OSF project 89kps) comes in two layouts, told apart by file name:

* MEVF's ``trainset.json`` / ``testset.json`` with images in ``images/`` (the layout most papers use);
* the OSF release ``VQA_RAD Dataset Public.json`` with images in ``VQA_RAD Image Folder/``, which adds
  ``qid_linked_id``, ``evaluation``, ``question_rephrase``… and marks its test questions with
  ``phrase_type`` ``test_freeform`` / ``test_para`` (MEVF's test set is exactly those).

SLAKE (Liu et al., ISBI 2021) has ``train.json`` / ``validate.json`` / ``test.json`` with images
``imgs/<img_name>`` (``xmlab1/source.jpg``); questions are in English and Chinese (``q_lang``), filtered by
``ReaderOptions.language``.

Rows are cleaned, not rewritten: ``answer_type`` loses stray spaces and is lower-cased ("CLOSED " →
"closed"); answers become strings (VQA-RAD stores counts as JSON numbers) with whitespace collapsed, their
case kept. ``id`` is the dataset's ``qid``; ``group_id`` is the image name, so that all questions about an
image fall in one split. With only ``trainset.json`` present (as in many copies of the data), rows carry no split
and prepare carves train/val/test from them by image with ``data.split_fractions``. With the official test
questions (``testset.json``, or the OSF file's test phrase types) the test split is kept and the training
questions are ``train|val``: prepare carves validation out of them by image. The official test set asks about
images of the training set (all 203 of its images are in ``trainset.json``): preparing it needs
``data.leakage_check: report``.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from medvl.data.readers.base import ReaderOptions, clean_text, has_replacement, load_json, read_image, require_dir
from medvl.data.records import TRAIN_OR_VAL, ReaderOutput, Record, Repaired, Skipped

ANSWER_TYPES = ("closed", "open")
VQA_RAD_MEVF_FILES = {"trainset.json": TRAIN_OR_VAL, "testset.json": "test"}
VQA_RAD_OSF_FILE = "VQA_RAD Dataset Public.json"
VQA_RAD_OSF_IMAGES = "VQA_RAD Image Folder"
VQA_RAD_META = ("image_organ", "question_type", "phrase_type", "qid_linked_id")
SLAKE_FILES = {"train.json": "train", "validate.json": "val", "test.json": "test"}
SLAKE_META = ("img_id", "q_lang", "content_type", "modality", "location", "base_type")


def read_vqa_rad(source: str, options: ReaderOptions) -> ReaderOutput:
    root = require_dir(source, "VQA-RAD")
    mevf = {name: split for name, split in VQA_RAD_MEVF_FILES.items() if (root / name).is_file()}
    if mevf.keys() == {"trainset.json"}:
        mevf["trainset.json"] = ""  # no test file: prepare carves val/test by image (data.split_fractions)
    if mevf:
        tables = [(*_load_rows(root / name), lambda row, split=split: split) for name, split in mevf.items()]
        image_dir = root / "images"
    elif (root / VQA_RAD_OSF_FILE).is_file():
        tables = [(*_load_rows(root / VQA_RAD_OSF_FILE), _osf_split)]
        image_dir = root / VQA_RAD_OSF_IMAGES
    else:
        raise ValueError(
            f"{source!r} is not a VQA-RAD layout: neither trainset.json/testset.json nor {VQA_RAD_OSF_FILE!r} in it"
        )
    return (
        item
        for rows, repaired, split_of in tables
        for item in _read_qa_rows(rows, split_of, image_dir, "image_name", VQA_RAD_META, options, root, repaired)
    )


def _osf_split(row: dict[str, Any]) -> str:
    return "test" if str(row.get("phrase_type", "")).startswith("test") else TRAIN_OR_VAL


def read_slake(source: str, options: ReaderOptions) -> ReaderOutput:
    root = require_dir(source, "SLAKE")
    tables = [(*_load_rows(root / name), split) for name, split in SLAKE_FILES.items() if (root / name).is_file()]
    if not tables:
        raise ValueError(f"{source!r} is not a SLAKE layout: no train.json / validate.json / test.json in it")
    language = None if options.language == "all" else options.language
    return (
        item
        for rows, repaired, split in tables
        for item in _read_qa_rows(
            rows, lambda row, split=split: split, root / "imgs", "img_name", SLAKE_META, options, root, repaired,
            language,
        )
    )


def _load_rows(path: Path) -> tuple[list, bool]:
    """The file's rows, and whether undecodable bytes were replaced while reading it."""
    rows, repaired = load_json(path)
    if not isinstance(rows, list):
        raise ValueError(f"{path} holds a JSON {type(rows).__name__}, expected a list of questions")
    return rows, repaired


def _read_qa_rows(
    rows: Any,
    split_of: Callable[[dict[str, Any]], str],
    image_dir: Path,
    image_key: str,
    meta_keys: tuple[str, ...],
    options: ReaderOptions,
    root: Path,
    file_repaired: bool = False,
    language: str | None = None,
) -> ReaderOutput:
    """``file_repaired``: the file held bytes that were not UTF-8 (rows showing U+FFFD are counted as repaired);
    ``language``: keep only rows whose ``q_lang`` is it (SLAKE), the others are skipped as other_language."""
    for index, row in enumerate(rows):
        qid = row.get("qid") if isinstance(row, dict) else None
        row_id = str(qid) if qid not in (None, "") else f"row {index}"
        if language is not None and isinstance(row, dict) and row.get("q_lang") != language:
            yield Skipped(row_id, "other_language")
            continue
        image_name = row.get(image_key) if isinstance(row, dict) else None
        question = row.get("question") if isinstance(row, dict) else None
        answer = row.get("answer") if isinstance(row, dict) else None
        answer_type = row.get("answer_type") if isinstance(row, dict) else None
        answer_type = answer_type.strip().lower() if isinstance(answer_type, str) else None
        if not (
            qid not in (None, "")
            and isinstance(image_name, str) and image_name.strip()
            and isinstance(question, str) and question.strip()
            and isinstance(answer, (str, int, float))
            and answer_type in ANSWER_TYPES
        ):
            yield Skipped(row_id, "malformed_row")
            continue
        answer = clean_text(str(answer))
        if not answer:
            yield Skipped(row_id, "empty_target")
            continue
        image_name = image_name.strip()
        image = read_image([image_dir / image_name], options, root)
        if isinstance(image, str):
            yield Skipped(row_id, image)
            continue
        meta = {k: row[k].strip() if isinstance(row[k], str) else row[k] for k in meta_keys if k in row}
        if file_repaired and has_replacement(image_name, question, answer, *meta.values()):
            yield Repaired(row_id, "undecodable_text")
        yield Record(
            id=row_id, group_id=image_name, image=image, question=clean_text(question), answer=answer,
            answer_type=answer_type, split=split_of(row), meta=meta,
        )
