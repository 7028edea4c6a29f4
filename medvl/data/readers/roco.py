"""ROCO v1 and ROCOv2: figures from PubMed Central open-access papers with their captions.

ROCO v1 (github.com/razorx89/roco-dataset) has one folder per split and subset,
``<split>/radiology/`` and ``<split>/non-radiology/`` (splits ``train``, ``validation``, ``test``),
each with tab-separated lists keyed by ROCO id: ``captions.txt`` (``ID<TAB> caption``), ``keywords.txt``,
``cuis.txt`` and ``semtypes.txt`` (``ID<TAB><TAB>value<TAB>value…``), ``licences.txt`` (a CSV:
``ROCO_ID,PMC_ID,CC``) and ``dlinks.txt`` (where ``scripts/fetch.py`` downloads each image from).
``fetch.py`` saves images as ``images/<PMC id>_<figure file>``; re-distributions rename them
``images/<ROCO id>.jpg``. Both names are looked up. Only ``radiology`` is read unless
``ReaderOptions.include_non_radiology``. The repository renamed some lists
(``cuis_tp_test_revised.txt``…); :func:`~medvl.data.readers.base.find_file` finds either name.

ROCOv2 (Zenodo, Rückert et al., Sci Data 2024) has ``{train,valid,test}_captions.csv`` (``ID,Caption``),
``{split}_concepts.csv`` (``ID,CUIs`` with CUIs separated by ``;``), ``{split}_concepts_manual.csv`` (the same
layout: the manually curated modality, body-region and direction concepts) and images ``<split>/<ID>.jpg``.
``meta["cuis"]`` holds both lists. ``ReaderOptions.modalities`` keeps only images carrying a CUI of one of the
named modalities (:data:`MODALITY_CUIS`); an image with no concepts at all (a split released without its
concepts files) has no known modality and is left out too. Like MIMIC-CXR's ``frontal_only``, a filtered image
is not a skipped row: it is simply not part of the selection.

Neither has patient ids, so ``group_id`` is the image id; both have official splits, which are kept.
Text files are read with undecodable bytes replaced (U+FFFD); a kept row whose id or caption shows one is
counted as repaired.
"""
from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from medvl.data.readers.base import ReaderOptions, clean_text, find_file, has_replacement, read_image, require_dir
from medvl.data.records import ReaderOutput, Record, Repaired, Skipped

ROCO_SPLITS = {"train": "train", "validation": "val", "test": "test"}
ROCOV2_SPLITS = {"train": "train", "valid": "val", "test": "test"}
SEMTYPE_CODE = re.compile(r"T\d{3}")
# data.modalities → the UMLS CUIs that mark an image of that modality in ROCOv2's concepts files
MODALITY_CUIS = {
    "ct": ("C0040405",),  # X-Ray Computed Tomography
    "mri": ("C0024485",),  # Magnetic Resonance Imaging
    "xray": ("C1306645", "C0034571"),  # Plain x-ray; Roentgenography (radiography)
    "ultrasound": ("C0041618",),  # Ultrasonography
    "angiography": ("C0002978",),  # Angiogram
    "pet": ("C0032743",),  # Positron-Emission Tomography
}


def read_roco(source: str, options: ReaderOptions) -> ReaderOutput:
    root = require_dir(source, "ROCO")
    if not any((root / split).is_dir() for split in ROCO_SPLITS) and (root / "data").is_dir():
        root = root / "data"  # a clone of the repository
    subsets = ("radiology", "non-radiology") if options.include_non_radiology else ("radiology",)
    folders = [
        (root / split / subset, split_name, subset)
        for split, split_name in ROCO_SPLITS.items()
        for subset in subsets
        if find_file(root / split / subset, "captions")
    ]
    if not folders:
        raise ValueError(f"{source!r} is not a ROCO layout: no <split>/radiology/captions.txt under it")
    return (item for folder in folders for item in _read_roco_folder(*folder, options, root))


def _read_roco_folder(folder: Path, split: str, subset: str, options: ReaderOptions, root: Path) -> ReaderOutput:
    keywords = _read_tab_lists(find_file(folder, "keywords"))
    cuis = _read_tab_lists(find_file(folder, "cuis"))
    semtypes = _read_tab_lists(find_file(folder, "semtypes"))
    licences, image_files = _read_licences(find_file(folder, "licences"))
    image_files.update(_read_dlinks(find_file(folder, "dlinks")))
    captions = find_file(folder, "captions")
    for line_no, line in enumerate(captions.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        image_id, tab, caption = line.partition("\t")
        if not tab or len(image_id.split()) != 1:
            yield Skipped(image_id.split()[0] if image_id.split() else f"{captions.name}:{line_no}", "malformed_row")
            continue
        image_id, caption = image_id.strip(), clean_text(caption)
        if not caption:
            yield Skipped(image_id, "empty_target")
            continue
        names = [f"{image_id}.jpg"] + ([image_files[image_id]] if image_id in image_files else [])
        image = read_image((folder / "images" / name for name in names), options, root)
        if isinstance(image, str):
            yield Skipped(image_id, image)
            continue
        if has_replacement(image_id, caption):  # read with errors="replace"
            yield Repaired(image_id, "undecodable_text")
        meta = {
            "subset": subset,
            "keywords": keywords.get(image_id, []),
            "cuis": cuis.get(image_id, []),
            "semtypes": [t for t in semtypes.get(image_id, []) if SEMTYPE_CODE.fullmatch(t)],
            "licence": licences.get(image_id, ""),
        }
        yield Record(id=image_id, group_id=image_id, image=image, text=caption, split=split, meta=meta)


def _read_tab_lists(path: Path | None) -> dict[str, list[str]]:
    """``ID<TAB><TAB>a<TAB>b`` lines as {ID: [a, b]}; {} when the file is absent."""
    if path is None:
        return {}
    lists = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        image_id, *values = line.split("\t")
        lists[image_id.strip()] = [v.strip() for v in values if v.strip()]
    return lists


def _read_licences(path: Path | None) -> tuple[dict[str, str], dict[str, str]]:
    """({ROCO id: licence}, {ROCO id: image file name}) from ``licences.txt``."""
    licences, files = {}, {}
    if path is not None:
        with open(path, encoding="utf-8-sig", newline="") as f:
            for row in csv.DictReader(f):
                image_id = (row.get("ROCO_ID") or "").strip()
                licences[image_id] = (row.get("CC") or "").strip()
                if row.get("PMC_ID"):
                    files[image_id] = row["PMC_ID"].strip()
    return licences, files


def _read_dlinks(path: Path | None) -> dict[str, str]:
    """{ROCO id: image file name} as ``fetch.py`` names downloads: ``<PMC id>_<figure file>``."""
    files = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if path else []:
        parts = line.split("\t")
        archive = next((word for word in parts[1].split() if word.endswith(".tar.gz")), "") if len(parts) == 3 else ""
        if archive:
            files[parts[0].strip()] = f"{archive.rsplit('/', 1)[-1][: -len('.tar.gz')]}_{parts[2].strip()}"
    return files


def read_rocov2(source: str, options: ReaderOptions) -> ReaderOutput:
    root = require_dir(source, "ROCOv2")
    splits = [split for split in ROCOV2_SPLITS if (root / f"{split}_captions.csv").is_file()]
    if not splits:
        raise ValueError(f"{source!r} is not a ROCOv2 layout: no {{train,valid,test}}_captions.csv in it")
    for split in splits:
        with open(root / f"{split}_captions.csv", encoding="utf-8-sig", errors="replace", newline="") as f:
            header = next(csv.reader(f), [])
        if [h.strip() for h in header] != ["ID", "Caption"]:
            raise ValueError(f"{split}_captions.csv header is {header}, expected ['ID', 'Caption']")
    return (item for split in splits for item in _read_rocov2_split(root, split, options))


def modality_cuis(modalities: Iterable[str]) -> frozenset[str]:
    """The CUIs of the named modalities; ValueError naming an unknown one."""
    unknown = [m for m in modalities if m not in MODALITY_CUIS]
    if unknown:
        raise ValueError(f"unknown modality {unknown[0]!r}; known: {', '.join(MODALITY_CUIS)}")
    return frozenset(cui for m in modalities for cui in MODALITY_CUIS[m])


def _read_rocov2_split(root: Path, split: str, options: ReaderOptions) -> Iterator[Record | Skipped]:
    concepts = _read_concepts(root / f"{split}_concepts.csv")
    for image_id, cuis in _read_concepts(root / f"{split}_concepts_manual.csv").items():
        concepts[image_id] = list(dict.fromkeys(concepts.get(image_id, []) + cuis))
    wanted = modality_cuis(options.modalities)
    with open(root / f"{split}_captions.csv", encoding="utf-8-sig", errors="replace", newline="") as f:
        rows = csv.reader(f)
        next(rows)
        for row in rows:
            if not row:
                continue
            image_id = row[0].strip()
            if len(row) != 2 or not image_id:
                yield Skipped(image_id or f"{split}_captions.csv:{rows.line_num}", "malformed_row")
                continue
            if wanted and wanted.isdisjoint(concepts.get(image_id, ())):
                continue
            caption = clean_text(row[1])
            if not caption:
                yield Skipped(image_id, "empty_target")
                continue
            image = read_image([root / split / f"{image_id}.jpg"], options, root)
            if isinstance(image, str):
                yield Skipped(image_id, image)
                continue
            if has_replacement(image_id, caption):  # read with errors="replace"
                yield Repaired(image_id, "undecodable_text")
            meta = {"cuis": concepts.get(image_id, [])}
            yield Record(
                id=image_id, group_id=image_id, image=image, text=caption, split=ROCOV2_SPLITS[split], meta=meta
            )


def _read_concepts(path: Path) -> dict[str, list[str]]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8-sig", newline="") as f:
        return {
            row["ID"].strip(): [c.strip() for c in (row.get("CUIs") or "").split(";") if c.strip()]
            for row in csv.DictReader(f)
            if row.get("ID")
        }
