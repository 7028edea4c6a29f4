"""What every reader shares: the options, split names, and the few file helpers they all need.

Readers only read files. They yield the image file's bytes untouched (decoding is checked later, in
``prepare``), and turn every row they cannot use into a :class:`~medvl.data.records.Skipped` with a
reason, in this order of checks: ``malformed_row``, ``empty_target`` (or a dataset-specific reason
such as ``no_findings_section``), ``path_outside_source``, ``missing_image``. Rows a setting filters out
are skipped too (``other_language``, ``not_frontal``), and a row kept after its text was repaired is
announced by a :class:`~medvl.data.records.Repaired` (``undecodable_text``), so that prepare counts every
row. They raise only when ``source`` is not the dataset's layout at all, and they do so when called, not at
the first ``next()``; one bad row never aborts a read.

Every file a row names is resolved (symlinks followed) and must lie under ``source``: a ``../`` path, an
absolute path or a symlink out of the tree is refused as ``path_outside_source``, never read.
"""
from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPLIT_NAMES = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validate": "val",
    "validation": "val",
    "test": "test",
}
"""Each dataset's own split names, mapped to medvl's "train" / "val" / "test"."""


@dataclass(frozen=True)
class ReaderOptions:
    """Choices that change which rows a reader yields (each reader ignores those not about it)."""

    language: str = "en"  # SLAKE q_lang to keep; "all" keeps every language
    require_image: bool = True  # False: a missing image file gives a Record with image=b"" (text-only use)
    frontal_only: bool = False  # MIMIC-CXR: keep only PA/AP views (needs mimic-cxr-2.0.0-metadata.csv)
    include_non_radiology: bool = False  # ROCO v1: also read the */non-radiology folders
    modalities: tuple[str, ...] = ()  # ROCOv2: keep only these modalities (see roco.MODALITY_CUIS); () = all
    max_studies: int = 0  # MIMIC-CXR: stop after this many studies with a record; 0 = all


def clean_text(text: str) -> str:
    """Collapse every run of whitespace (newlines included) to one space and strip the ends."""
    return " ".join(text.split())


REPLACEMENT_CHARACTER = "\ufffd"  # what errors="replace" puts where bytes were not UTF-8


def read_image(candidates: Iterable[Path], options: ReaderOptions, root: Path) -> bytes | str:
    """Bytes of the first candidate file that exists; b"" if none does and images are optional. Otherwise the
    skip reason: "path_outside_source" (a candidate resolves outside ``root``), "malformed_row" (a name no
    filesystem takes, e.g. with a NUL byte) or "missing_image"."""
    top = root.resolve()
    for path in candidates:
        try:
            resolved = path.resolve()
            if not resolved.is_relative_to(top):
                return "path_outside_source"
            if resolved.is_file():
                return resolved.read_bytes()
        except ValueError:
            return "malformed_row"
        except OSError:  # unreadable (permissions, a name too long): as good as missing
            continue
    return "missing_image" if options.require_image else b""


def load_json(path: Path) -> tuple[Any, bool]:
    """A JSON file's content, and whether bytes that were not UTF-8 had to be replaced to read it."""
    data = path.read_bytes()
    try:
        return json.loads(data.decode("utf-8-sig")), False
    except UnicodeDecodeError:
        return json.loads(data.decode("utf-8-sig", errors="replace")), True


def has_replacement(*texts: Any) -> bool:
    return any(isinstance(text, str) and REPLACEMENT_CHARACTER in text for text in texts)


def require_dir(source: str, what: str) -> Path:
    """``source`` as a folder (raises ValueError if it is none)."""
    root = Path(source)
    if not root.is_dir():
        raise ValueError(f"{what} source {source!r} is not a directory")
    return root


def find_file(folder: Path, stem: str, suffix: str = ".txt") -> Path | None:
    """``stem.txt``, else the one ``stem_*.txt`` (the ROCO repository renamed some lists, e.g.
    ``cuis_tp_test_revised.txt``); None when neither exists."""
    exact = folder / f"{stem}{suffix}"
    if exact.is_file():
        return exact
    renamed = sorted(folder.glob(f"{stem}_*{suffix}"))
    return renamed[0] if renamed else None


def open_csv_rows(path: Path) -> Iterator[dict[str, str]]:
    """Rows of a CSV (plain or .gz, optional BOM) as dicts keyed by the header."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8-sig", newline="") as text:
        yield from csv.DictReader(text)
