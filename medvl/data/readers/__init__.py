"""Readers: each turns one published dataset layout in a local folder into Records and Skipped rows.

``read_dataset("vqa_rad", "/data/vqa_rad")`` picks the reader by name. Every reader has the signature
``(source, options) -> Iterator[Record | Skipped]``, checks the layout when called (raising ValueError
on a folder that is not that dataset), then streams rows lazily; see :mod:`medvl.data.readers.base`
for the rules they share.
"""
from __future__ import annotations

from collections.abc import Callable

from medvl.data.readers.base import ReaderOptions
from medvl.data.readers.iu_xray import read_iu_xray
from medvl.data.readers.mimic_cxr import extract_findings, read_mimic_cxr
from medvl.data.readers.roco import read_roco, read_rocov2
from medvl.data.readers.vqa import read_slake, read_vqa_rad
from medvl.data.records import ReaderOutput

READERS: dict[str, Callable[[str, ReaderOptions], ReaderOutput]] = {
    "roco": read_roco,
    "rocov2": read_rocov2,
    "mimic_cxr": read_mimic_cxr,
    "iu_xray": read_iu_xray,
    "vqa_rad": read_vqa_rad,
    "slake": read_slake,
}


def read_dataset(format: str, source: str, options: ReaderOptions | None = None) -> ReaderOutput:
    if format not in READERS:
        raise ValueError(f"unknown dataset format {format!r}; known formats: {', '.join(sorted(READERS))}")
    return READERS[format](source, options or ReaderOptions())


__all__ = [
    "READERS",
    "ReaderOptions",
    "extract_findings",
    "read_dataset",
    "read_iu_xray",
    "read_mimic_cxr",
    "read_roco",
    "read_rocov2",
    "read_slake",
    "read_vqa_rad",
]
