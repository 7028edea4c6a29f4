"""Agreement of medvl's CheXpert labeler with independent human labels: the MeSH codes of the IU chest X-ray set.

    python benchmarks/labeler_agreement.py --reports PATH/indiana_reports.csv [--split dev|test|all]
                                           [--convention lenient|strict] [--errors N]

The reports are the Indiana University chest X-ray collection (Open-i; Demner-Fushman et al., JAMIA 2016), in the
CSV layout of the Kaggle copy "raddar/chest-xrays-indiana-university" (``indiana_reports.csv``: uid, MeSH,
Problems, image, indication, comparison, findings, impression). Its licence is not ours to redistribute: get it
from Open-i or Kaggle and pass its path. Human indexers coded each report's *positive* findings as MeSH headings
with modifiers ("Cardiomegaly/borderline", "Opacity/lung/base/left"), or "normal"; negated findings are not
coded. Those codes were made without any labeler, so they are an independent reference.

**Split.** dev = odd uid, test = even uid, fixed before any error was looked at. Rules were changed only by
studying dev errors (``--errors`` refuses the test split); report the test half as the held-out number. Two
mapping choices were corrected after reading dev disagreements, both toward CheXpert's own definitions (a /round
opacity is a nodule; devices alone leave No Finding); every other choice was fixed before.

**Rows.** A report is scored when it has findings or impression text and its MeSH is not "No Indexing". The
labeler reads ``FINDINGS: <findings> IMPRESSION: <impression>`` (the indication and comparison are not given).

**Mapping** (``MESH_TO_OBSERVATION``). Each MeSH heading maps to at most one CheXpert observation, by what the
observation covers in the CheXpert labeler's own mention lists (so "scar" is Lung Opacity, "pulmonary congestion"
and "heart failure" are Edema, "fibrosis" is Pleural Other, as CheXpert has them); headings with no counterpart
(granuloma, calcinosis, hypoinflation, tortuous aorta, spine, hiatal hernia, deformity, blunted costophrenic
angle ...) are ignored, so they are neither a positive nor a negative for any of the 14. Choices:

* "normal" (the whole MeSH field) is No Finding, and so is a field whose only codes are support devices or
  "Technical Quality of Image Unsatisfactory" (CheXpert's No Finding allows support devices). A report coded
  with an ignored heading ("Calcified Granuloma", "Lung/hypoinflation") is *not* No Finding for the humans,
  while the labeler may call it so: that disagreement comes from the mapping, and it is counted, not hidden.
* Opacity, Density, Nodule, Mass and Cicatrix count only in the lung: a modifier naming another site (ribs,
  thorax, breast, mediastinum, ...) drops the code ("Density/ribs" is a bone finding; "Density/thorax" is not
  placed in the lung). A /round Opacity or Density is a nodule: Lung Lesion (CheXpert lists "nodular opacity"
  and "nodular density" there), and a round Opacity is also Lung Opacity (as "opaci" makes it for CheXpert).
  Cicatrix/pleura is Pleural Other ("pleural scar").
* "Cardiac Shadow" and "Mediastinum" count only with a size modifier (enlarged / prominent / borderline);
  mediastinal lymph nodes are not Enlarged Cardiomediastinum.
* Markings, Lung and Thickening count only as an interstitial pattern or bronchial wall thickening (Lung Opacity)
  or pleural thickening (Pleural Other); bronchovascular markings are ignored.
* The modifier /borderline makes the human label *uncertain*; every other modifier (mild, severe, chronic,
  healed, small ...) leaves it positive.
* Support Devices: catheters, inserted tubes, implanted and other medical devices, surgical instruments (clips,
  sternotomy wires), stents, sutures and breast implants; foreign bodies and procedures (Spinal Fusion) are not.
* Hydro-/hemopneumothorax count as both Pneumothorax and Pleural Effusion; hemothorax as Pleural Effusion.

**What counts as a positive.** The default ``lenient`` convention binarises both sides the same way: present =
positive or uncertain (the labeler's 1.0 or -1.0; a human code, /borderline or not). MeSH indexers code a finding
the report names, hedged ones included ("borderline cardiomegaly" is coded), and never a negated one, so the
human label answers "is it asserted or entertained"; it is also how ``clinical_metrics`` scores reports
(uncertain counted as positive). ``strict`` counts only positives (labeler 1.0; a human code without /borderline)
and is printed too. Per-observation precision, recall and F1 are printed with their counts (observations with
fewer than 10 human positives are marked: their F1 means little, but they count in the micro average); the last
line is the micro-F1 over all 14 observations of the chosen convention.
"""
from __future__ import annotations

import argparse
import csv
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from medvl.eval.chexpert import OBSERVATIONS, CheXpertLabeler

POSITIVE, UNCERTAIN = 1.0, -1.0
FEW_POSITIVES = 10

NF, ECM, CM, LL, LO, ED, CO, PN, AT, PX, PE, PO, FR, SD = OBSERVATIONS

# Sites that place a finding outside the lung (first modifier after the heading, or any later one).
NON_LUNG_SITES = frozenset({
    "ribs", "thorax", "mediastinum", "breast", "heart", "sternum", "clavicle", "humerus", "spine", "shoulder",
    "thoracic vertebrae", "lumbar vertebrae", "cervical vertebrae", "abdomen", "neck", "diaphragm", "pleura",
    "soft tissue", "adipose tissue", "trachea", "aorta", "bone and bones", "heart ventricles", "heart atria",
    "pulmonary artery", "cardiophrenic angle",
})
SIZE_MODIFIERS = frozenset({"enlarged", "prominent", "borderline", "widened"})


def _always(modifiers: tuple[str, ...]) -> bool:
    return True


def _in_lung(modifiers: tuple[str, ...]) -> bool:
    return not NON_LUNG_SITES.intersection(modifiers)


def _sized(modifiers: tuple[str, ...]) -> bool:
    return bool(SIZE_MODIFIERS.intersection(modifiers))


def _sized_not_nodes(modifiers: tuple[str, ...]) -> bool:
    return _sized(modifiers) and "lymph nodes" not in modifiers


def _round(modifiers: tuple[str, ...]) -> bool:
    return _in_lung(modifiers) and "round" in modifiers


def _interstitial(modifiers: tuple[str, ...]) -> bool:
    return "interstitial" in modifiers or "bronchi" in modifiers


def _pleural(modifiers: tuple[str, ...]) -> bool:
    return "pleura" in modifiers


# MeSH heading -> [(observation, does this code count, given its modifiers)]. Headings not listed are ignored.
MESH_TO_OBSERVATION: dict[str, list[tuple[str, Callable[[tuple[str, ...]], bool]]]] = {
    "Cardiomegaly": [(CM, _always)],
    "Cardiac Shadow": [(CM, _sized)],
    "Mediastinum": [(ECM, _sized_not_nodes)],
    "Nodule": [(LL, _in_lung)],
    "Mass": [(LL, _in_lung)],
    "Cavitation": [(LL, _in_lung)],  # CheXpert: "cavitary lesion"
    "Opacity": [(LO, _in_lung), (LL, _round)],  # CheXpert: "nodular opacity" is Lung Lesion (and "opaci" Opacity)
    "Density": [(LO, lambda m: _in_lung(m) and "round" not in m), (LL, _round)],  # CheXpert: "nodular density"
    "Airspace Disease": [(LO, _always)],
    "Infiltrate": [(LO, _always)],
    "Cicatrix": [(LO, lambda m: _in_lung(m) and not _pleural(m)), (PO, _pleural)],  # CheXpert: "scar"
    "Markings": [(LO, _interstitial)],  # CheXpert: "interstitial marking"
    "Lung": [(LO, _interstitial)],
    "Lung Diseases, Interstitial": [(LO, _always)],  # CheXpert: "interstitial lung"
    "Thickening": [(LO, _interstitial), (PO, _pleural)],  # CheXpert: "peribronchial thickening", "pleural thickening"
    "Pulmonary Edema": [(ED, _always)],
    "Pulmonary Congestion": [(ED, _always)],  # CheXpert: "pulmonary congestion"
    "Heart Failure": [(ED, _always)],  # CheXpert: "heart failure", "chf"
    "Consolidation": [(CO, _always)],
    "Pneumonia": [(PN, _always)],
    "Pulmonary Atelectasis": [(AT, _always)],
    "Pneumothorax": [(PX, _always)],
    "Hydropneumothorax": [(PX, _always), (PE, _always)],
    "Hemopneumothorax": [(PX, _always), (PE, _always)],
    "Pleural Effusion": [(PE, _always)],
    "Hemothorax": [(PE, _always)],
    "Pulmonary Fibrosis": [(PO, _always)],  # CheXpert lists "fibrosis" under Pleural Other
    "Fibrosis": [(PO, _always)],
    "Fractures, Bone": [(FR, _always)],
    "Catheters, Indwelling": [(SD, _always)],
    "Tube, Inserted": [(SD, _always)],
    "Implanted Medical Device": [(SD, _always)],
    "Medical Device": [(SD, _always)],
    "Surgical Instruments": [(SD, _always)],
    "Stents": [(SD, _always)],
    "Sutures": [(SD, _always)],
    "Breast Implants": [(SD, _always)],
}
NOT_INDEXED = "no indexing"
# Codes that are no finding about the patient's chest: with only these (or devices), the study is No Finding, as
# CheXpert defines it (support devices do not rule No Finding out).
NOT_A_FINDING = frozenset({"Technical Quality of Image Unsatisfactory"})


def human_labels(mesh: str) -> dict[str, float] | None:
    """The observations a MeSH field codes: {observation: 1.0 or -1.0 (/borderline)}; None if not indexed."""
    mesh = (mesh or "").strip()
    if not mesh or mesh.lower() == NOT_INDEXED:
        return None
    if mesh.lower() == "normal":
        return {NF: POSITIVE}
    labels: dict[str, float] = {}
    headings = {code.split("/")[0].strip() for code in mesh.split(";")}
    for code in mesh.split(";"):
        heading, *rest = [part.strip() for part in code.split("/")]
        modifiers = tuple(part.lower() for part in rest)
        value = UNCERTAIN if "borderline" in modifiers else POSITIVE
        for observation, counts in MESH_TO_OBSERVATION.get(heading, []):
            if counts(modifiers):
                labels[observation] = max(labels.get(observation, value), value)  # positive over uncertain
    if set(labels) <= {SD} and headings <= NOT_A_FINDING | {h for h, rules in MESH_TO_OBSERVATION.items()
                                                          if [o for o, _ in rules] == [SD]}:
        labels[NF] = POSITIVE
    return labels


@dataclass(frozen=True)
class Row:
    uid: int
    text: str
    human: dict[str, float]


def report_text(findings: str, impression: str) -> str:
    parts = [f"{header}: {body.strip()}" for header, body in (("FINDINGS", findings), ("IMPRESSION", impression))
             if body and body.strip()]
    return "\n".join(parts)


def read_rows(path: Path | str, split: str) -> Iterator[Row]:
    with open(path, newline="", encoding="utf-8") as handle:
        for record in csv.DictReader(handle):
            uid = int(record["uid"])
            if (split == "dev" and uid % 2 == 0) or (split == "test" and uid % 2 == 1):
                continue
            human = human_labels(record["MeSH"])
            text = report_text(record.get("findings", ""), record.get("impression", ""))
            if human is not None and text:
                yield Row(uid, text, human)


def is_present(value: float | None, convention: str) -> bool:
    return value == POSITIVE or (convention == "lenient" and value == UNCERTAIN)


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, human: bool, machine: bool) -> None:
        self.tp += human and machine
        self.fp += machine and not human
        self.fn += human and not machine

    def scores(self) -> tuple[float, float, float]:
        precision = self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0
        recall = self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return precision, recall, f1


def agreement(pairs: Iterable[tuple[dict[str, float], dict[str, float | None]]],
              convention: str) -> dict[str, Counts]:
    """Per-observation counts over (human, labeler) label pairs, both binarised by ``convention``."""
    counts = {name: Counts() for name in OBSERVATIONS}
    for human, machine in pairs:
        for name in OBSERVATIONS:
            counts[name].add(is_present(human.get(name), convention), is_present(machine.get(name), convention))
    return counts


def micro(counts: dict[str, Counts]) -> Counts:
    return Counts(*(sum(getattr(c, field) for c in counts.values()) for field in ("tp", "fp", "fn")))


def print_table(counts: dict[str, Counts]) -> None:
    print(f"{'observation':<28}{'human+':>7}{'labeler+':>9}{'TP':>6}{'P':>7}{'R':>7}{'F1':>7}")
    for name, c in counts.items():
        precision, recall, f1 = c.scores()
        few = "  (few human positives)" if c.tp + c.fn < FEW_POSITIVES else ""
        print(f"{name:<28}{c.tp + c.fn:>7}{c.tp + c.fp:>9}{c.tp:>6}{precision:>7.3f}{recall:>7.3f}{f1:>7.3f}{few}")


def print_errors(rows: list[Row], labels: list[dict[str, float | None]], convention: str, limit: int) -> None:
    shown = 0
    for row, machine in zip(rows, labels):
        wrong = [(name, row.human.get(name), machine.get(name)) for name in OBSERVATIONS
                 if is_present(row.human.get(name), convention) != is_present(machine.get(name), convention)]
        if wrong and shown < limit:
            shown += 1
            print(f"--- uid {row.uid}: " + "; ".join(f"{n} human={h} labeler={m}" for n, h, m in wrong))
            print(row.text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", required=True, help="indiana_reports.csv (Open-i / Kaggle IU X-ray)")
    parser.add_argument("--split", choices=("dev", "test", "all"), default="dev")
    parser.add_argument("--convention", choices=("lenient", "strict"), default="lenient")
    parser.add_argument("--errors", type=int, default=0, help="print up to N disagreeing dev reports")
    args = parser.parse_args()
    if args.errors and args.split != "dev":
        parser.error("--errors: study the dev split only; the test split stays held out")

    rows = list(read_rows(args.reports, args.split))
    labeler = CheXpertLabeler()
    labels = labeler.label_many(row.text for row in rows)
    if args.errors:
        print_errors(rows, labels, args.convention, args.errors)
    print(f"split {args.split}: {len(rows)} reports (dev = odd uid, test = even uid)")
    other = "strict" if args.convention == "lenient" else "lenient"
    other_f1 = micro(agreement(zip((r.human for r in rows), labels), other)).scores()[2]
    counts = agreement(zip((r.human for r in rows), labels), args.convention)
    present = "positive or uncertain" if args.convention == "lenient" else "positive"
    print(f"convention {args.convention} (present = {present})")
    print_table(counts)
    total = micro(counts)
    precision, recall, f1 = total.scores()
    print(f"micro precision {precision:.3f} recall {recall:.3f}; {other} micro-F1 {other_f1:.3f}")
    print(f"micro-F1 {f1:.3f}")


if __name__ == "__main__":
    main()
