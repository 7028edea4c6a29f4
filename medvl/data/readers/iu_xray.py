"""IU X-ray (Indiana University chest X-rays, OpenI): reports with their frontal and lateral images.

Two published layouts, told apart by what ``<source>`` holds:

* R2Gen's ``annotation.json``: ``{"train": […], "val": […], "test": […]}``, each study
  ``{"id": "CXR2384_IM-0942", "report": "…", "image_path": ["CXR2384_IM-0942/0.png", …], "split": "train"}``
  with images under ``<source>/images/``. Its ``report`` is the FINDINGS text and its split is kept: the key's,
  or, where the key is no split name (copies circulate with a blank or misspelled one), the study's own
  ``"split"``.
* The original NLM release: ``ecgen-radiology/<n>.xml`` reports (``<uId id="CXR<n>">``,
  ``<AbstractText Label="FINDINGS">``, ``<parentImage id="CXR1_1_IM-0001-3001">``) and the PNGs
  ``<id>.png`` in ``<source>/images/`` or ``<source>/NLMCXR_png/``. The target is FINDINGS (as in R2Gen);
  IMPRESSION and the MeSH major terms go to meta. No official split: ``split`` is "".

One record per image, not per study: R2Gen feeds both views of a study at once, but medvl's models take
one image, and a record per view keeps every image. The views of a study share text and ``group_id``
(the report id ``CXR<n>``, the closest the dataset has to a patient id), so they never land in two
splits. Record ids are the OpenI ``parentImage`` ids, or R2Gen's image path without its suffix and with
"/" made "_" (``CXR2384_IM-0942/0.png`` → ``CXR2384_IM-0942_0``).
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path, PurePosixPath

from medvl.data.readers.base import (
    SPLIT_NAMES,
    ReaderOptions,
    clean_text,
    has_replacement,
    load_json,
    read_image,
    require_dir,
)
from medvl.data.records import ReaderOutput, Record, Repaired, Skipped

XML_IMAGE_DIRS = ("images", "NLMCXR_png")


def read_iu_xray(source: str, options: ReaderOptions) -> ReaderOutput:
    root = require_dir(source, "IU X-ray")
    if (root / "annotation.json").is_file():
        annotation, repaired = load_json(root / "annotation.json")
        if not isinstance(annotation, dict) or not all(isinstance(v, list) for v in annotation.values()):
            raise ValueError(f"{root / 'annotation.json'} is not R2Gen's {{split: [studies]}} layout")
        return _read_r2gen(root, annotation, options, repaired)
    if (root / "ecgen-radiology").is_dir():
        return _read_openi(root, options)
    raise ValueError(f"{source!r} is not an IU X-ray layout: neither annotation.json nor ecgen-radiology/ in it")


def _read_r2gen(root: Path, annotation: dict[str, list], options: ReaderOptions, repaired: bool) -> ReaderOutput:
    for split_key, studies in annotation.items():
        for index, study in enumerate(studies):
            study_id = study.get("id") if isinstance(study, dict) else None
            paths = study.get("image_path") if isinstance(study, dict) else None
            report = study.get("report") if isinstance(study, dict) else None
            own_split = study.get("split") if isinstance(study, dict) else None
            split = SPLIT_NAMES.get(split_key) or (SPLIT_NAMES.get(own_split) if isinstance(own_split, str) else None)
            if not (
                isinstance(study_id, str) and study_id and isinstance(report, str) and split
                and isinstance(paths, list) and paths and all(isinstance(p, str) and p for p in paths)
            ):
                row_id = study_id if isinstance(study_id, str) and study_id else f"{split_key}[{index}]"
                yield Skipped(row_id, "malformed_row")
                continue
            text = clean_text(report)
            for path in paths:
                try:
                    image_id = str(PurePosixPath(path).with_suffix("")).replace("/", "_")
                except ValueError:  # "/", "." …: no file name at all
                    yield Skipped(f"{study_id}:{path}", "malformed_row")
                    continue
                if not text:
                    yield Skipped(image_id, "empty_target")
                    continue
                image = read_image([root / "images" / path], options, root)
                if isinstance(image, str):
                    yield Skipped(image_id, image)
                    continue
                if repaired and has_replacement(text, study_id):
                    yield Repaired(image_id, "undecodable_text")
                yield Record(
                    id=image_id, group_id=study_id.split("_")[0], image=image, text=text, split=split,
                    meta={"study_id": study_id},
                )


def _read_openi(root: Path, options: ReaderOptions) -> ReaderOutput:
    for xml_path in sorted((root / "ecgen-radiology").glob("*.xml"), key=_report_number):
        try:
            report = ET.parse(xml_path).getroot()
        except ET.ParseError:
            yield Skipped(xml_path.stem, "malformed_row")
            continue
        uid = report.find(".//uId")
        report_id = uid.get("id") if uid is not None and uid.get("id") else f"CXR{xml_path.stem}"
        sections = {el.get("Label", "").upper(): clean_text(el.text or "") for el in report.iter("AbstractText")}
        image_ids = [el.get("id") for el in report.iter("parentImage") if el.get("id")]
        if not image_ids:
            yield Skipped(report_id, "missing_image")
            continue
        meta = {
            "study_id": report_id,
            "impression": sections.get("IMPRESSION", ""),
            "mesh_major": [clean_text(el.text or "") for el in report.iter("major")],
        }
        for image_id in image_ids:
            if not sections.get("FINDINGS"):
                yield Skipped(image_id, "empty_target")
                continue
            image = read_image((root / folder / f"{image_id}.png" for folder in XML_IMAGE_DIRS), options, root)
            if isinstance(image, str):
                yield Skipped(image_id, image)
                continue
            yield Record(id=image_id, group_id=report_id, image=image, text=sections["FINDINGS"], meta=dict(meta))


def _report_number(path: Path) -> tuple[int, str]:
    """Sort 2.xml before 10.xml."""
    return (int(path.stem), "") if path.stem.isdigit() else (1 << 62, path.stem)
