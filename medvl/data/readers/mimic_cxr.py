"""MIMIC-CXR-JPG images with the FINDINGS section of their MIMIC-CXR free-text report.

Layout (PhysioNet, both credentialed): ``mimic-cxr-2.0.0-split.csv[.gz]`` (``dicom_id, study_id,
subject_id, split`` with splits train / validate / test) indexes the images
``files/p<first 2 digits>/p<subject>/s<study>/<dicom_id>.jpg`` (``.dcm`` is accepted too, the MIMIC-CXR
DICOM layout). The report of a study is ``files/p../p<subject>/s<study>.txt``, looked up under
``<source>``, ``<source>/mimic-cxr-reports`` (the reports zip unpacked beside the images) and inside the
study folder. The optional ``mimic-cxr-2.0.0-metadata.csv[.gz]`` gives ``ViewPosition`` (PA, AP,
LATERAL, LL…), stored as ``meta["view_position"]`` ("" without it); ``ReaderOptions.frontal_only`` keeps
PA and AP only. One record per image; ``group_id`` is the subject, so a patient never spans two splits.
``ReaderOptions.max_studies`` stops at that many studies that gave a record, in the split CSV's order (the
official CSV lists patients in order, so the first N studies are the first patients', every split included).

Section choice, in :func:`extract_findings`: a FINDINGS header (``FINDINGS:``, ``FINDING:``, on its own
line or inline) starts the section; the next known section header (INDICATION, HISTORY, TECHNIQUE,
COMPARISON, IMPRESSION, CONCLUSION, NOTIFICATION, RECOMMENDATION(S), ADDENDUM, WET READ, EXAMINATION…,
or another FINDINGS) ends it. The combined ``FINDINGS AND IMPRESSION:`` / ``FINDINGS/IMPRESSION:`` sections
count as findings: their text describes the image, which is the target here (the official
``section_parser.py`` files them under impression; they are ~0.1% of reports). Unlisted all-caps
labels inside the findings (``LUNGS:``, ``PA AND LATERAL VIEWS:``) stay part of it. Misspelled headers
(``FINDNGS``) and reports whose findings carry no header are not recovered: those studies are skipped as
``no_findings_section``. The de-identification token ``___`` is kept as written.
"""
from __future__ import annotations

import re
from pathlib import Path

from medvl.data.readers.base import (
    SPLIT_NAMES,
    ReaderOptions,
    clean_text,
    has_replacement,
    open_csv_rows,
    read_image,
    require_dir,
)
from medvl.data.records import ReaderOutput, Record, Repaired, Skipped

SPLIT_CSV = "mimic-cxr-2.0.0-split.csv"
SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv"
FRONTAL_VIEWS = ("PA", "AP")

_FINDINGS_HEADER = r"FINDINGS?(?:\s*(?:AND|/|&)\s*IMPRESSIONS?)?"
_OTHER_HEADER = (
    r"(?:(?:CLINICAL|PATIENT|REASON\s+FOR|TYPE\s+OF|REFERENCE)\s+)?"
    r"(?:INDICATIONS?|HISTORY|INFORMATION|EXAM(?:INATION)?|TECHNIQUE|COMPARISONS?(?:\s+(?:EXAM|FILM))?"
    r"|IMPRESSIONS?|CONCLUSIONS?|NOTIFICATIONS?|RECOMMENDATIONS?|RECOMMENDATION\(S\)|ADDENDUM|WET\s+READ|COMMENTS?)"
)
# Headers are upper case in these reports: matching case-sensitively keeps "Findings discussed with…" text.
_HEADER = re.compile(rf"(?<![A-Za-z])(?:(?P<findings>{_FINDINGS_HEADER})|{_OTHER_HEADER})\s*:")


def extract_findings(report: str) -> str:
    """The FINDINGS section of a MIMIC-CXR report with whitespace collapsed, or "" when it has none.

    Several non-empty FINDINGS sections are joined in order.
    """
    headers = list(_HEADER.finditer(report))
    sections = [
        report[header.end() : following.start() if following else len(report)]
        for header, following in zip(headers, headers[1:] + [None])
        if header.group("findings")
    ]
    return " ".join(text for text in map(clean_text, sections) if text)


def read_mimic_cxr(source: str, options: ReaderOptions) -> ReaderOutput:
    root = require_dir(source, "MIMIC-CXR-JPG")
    split_csv = _find_csv(root, SPLIT_CSV)
    if split_csv is None:
        raise ValueError(f"{source!r} is not a MIMIC-CXR-JPG layout: {SPLIT_CSV}[.gz] not found in it")
    metadata_csv = _find_csv(root, METADATA_CSV)
    if options.frontal_only and metadata_csv is None:
        raise ValueError(f"frontal_only needs {METADATA_CSV}[.gz] in {source!r} (it holds ViewPosition)")
    return _read(root, split_csv, metadata_csv, options)


def _read(root: Path, split_csv: Path, metadata_csv: Path | None, options: ReaderOptions) -> ReaderOutput:
    metadata = open_csv_rows(metadata_csv) if metadata_csv else []
    views = {row.get("dicom_id"): row.get("ViewPosition") or "" for row in metadata}
    study, findings = None, None  # the split CSV lists a study's images together: cache one study
    kept_studies: set[str] = set()
    for line_no, row in enumerate(open_csv_rows(split_csv), start=2):
        # DictReader fills the missing fields of a short row with None
        dicom_id, study_id, subject_id, split = ((row.get(k) or "").strip() for k in SPLIT_COLUMNS)
        split = SPLIT_NAMES.get(split)
        if not (dicom_id and study_id.isdigit() and subject_id.isdigit() and split):
            yield Skipped(dicom_id or f"{split_csv.name}:{line_no}", "malformed_row")
            continue
        view = views.get(dicom_id, "")
        if options.frontal_only and view not in FRONTAL_VIEWS:
            yield Skipped(dicom_id, "not_frontal")
            continue
        if options.max_studies and study_id not in kept_studies and len(kept_studies) >= options.max_studies:
            continue
        study_dir = Path("files") / f"p{subject_id[:2]}" / f"p{subject_id}" / f"s{study_id}"
        if study != study_dir:
            study, findings = study_dir, _read_findings(root, study_dir)
        if findings is None:
            yield Skipped(dicom_id, "missing_report")
            continue
        if not findings:
            yield Skipped(dicom_id, "no_findings_section")
            continue
        image = read_image((root / study_dir / f"{dicom_id}{ext}" for ext in (".jpg", ".dcm")), options, root)
        if isinstance(image, str):
            yield Skipped(dicom_id, image)
            continue
        if has_replacement(findings):  # reports are read with errors="replace"
            yield Repaired(dicom_id, "undecodable_text")
        meta = {"study_id": study_id, "subject_id": subject_id, "view_position": view}
        kept_studies.add(study_id)
        yield Record(id=dicom_id, group_id=subject_id, image=image, text=findings, split=split, meta=meta)


def _read_findings(root: Path, study_dir: Path) -> str | None:
    report_name = f"{study_dir.name}.txt"
    for path in (
        root / study_dir.parent / report_name,
        root / "mimic-cxr-reports" / study_dir.parent / report_name,
        root / study_dir / report_name,
    ):
        if path.is_file():
            return extract_findings(path.read_text(encoding="utf-8", errors="replace"))
    return None


def _find_csv(root: Path, name: str) -> Path | None:
    return next((p for p in (root / name, root / f"{name}.gz") if p.is_file()), None)
