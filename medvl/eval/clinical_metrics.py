"""Clinical-efficacy metrics for generated reports: CheXpert CE scores, laterality errors, hallucinations.

Labels are what ``medvl.eval.chexpert.CheXpertLabeler`` returns: ``{observation: 1.0 | -1.0 | 0.0 | None}``.
As in the R2Gen / CheXbert-style CE evaluation, uncertain (-1.0) counts as positive and blank (None, or NaN from a
CSV) as negative, so every cell is binary.

* Micro scores pool every (report, observation) cell. Macro scores average per-observation precision, recall and
  F1 (macro F1 is the mean of per-observation F1s, not the F1 of macro P and R) over the observations that have at
  least one positive in the references or the predictions: an observation absent from both says nothing about the
  model, and counting it as 0 (or as 1) would move the mean by the share of rare classes in the sample. With no
  positive anywhere every score is 0.0 (sklearn's ``zero_division=0``).
* "_14" scores use all 14 observations (No Finding included, as the CheXpert labeler outputs it); "_5" the five of
  CE5 (Cardiomegaly, Edema, Consolidation, Atelectasis, Pleural Effusion).
* Laterality and hallucination: see their docstrings.
"""
from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence

from medvl.eval.chexpert import CE5, OBSERVATIONS, CheXpertLabeler, LabeledReport, Mention

Labels = dict[str, float | None]
NO_FINDING = OBSERVATIONS[0]


def is_positive(value: float | None) -> bool:
    """1.0 and -1.0 are positive; 0.0, None and NaN are not."""
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and value in (1.0, -1.0)


def clinical_efficacy(ref_labels: list[Labels], gen_labels: list[Labels]) -> dict[str, float]:
    """CE precision / recall / F1, micro and macro, over the 14 observations and over CE5."""
    _check_lengths(ref_labels, gen_labels)
    scores: dict[str, float] = {}
    for suffix, observations in (("14", OBSERVATIONS), ("5", CE5)):
        counts = {name: _counts(ref_labels, gen_labels, name) for name in observations}
        micro = _prf(*(sum(c[i] for c in counts.values()) for i in range(3)))
        present = [c for c in counts.values() if c[0] + c[1] + c[2] > 0]  # tp + fp + fn: a positive somewhere
        per_class = [_prf(*c) for c in present]
        macro = tuple(sum(s[i] for s in per_class) / len(per_class) if per_class else 0.0 for i in range(3))
        for kind, values in (("micro", micro), ("macro", macro)):
            for metric, value in zip(("precision", "recall", "f1"), values):
                scores[f"ce_{kind}_{metric}_{suffix}"] = value
    return scores


def hallucination_rate(ref_labels: list[Labels], gen_labels: list[Labels]) -> dict[str, float]:
    """How often the generated report asserts a finding the reference does not.

    ``hallucination_rate``: of the (report, observation) cells positive or uncertain in the generated labels,
    the share that are negative or blank in the reference. ``reports_with_hallucination``: the share of reports
    with at least one such cell. No Finding is left out (it is a summary, not a finding); Support Devices is in.
    Both are 0.0 when there is nothing to count; ``generated_positives`` says how many cells were counted.
    """
    _check_lengths(ref_labels, gen_labels)
    observations = OBSERVATIONS[1:]
    positives = hallucinated = reports_hit = 0
    for ref, gen in zip(ref_labels, gen_labels):
        claimed = [name for name in observations if is_positive(gen.get(name))]
        wrong = sum(not is_positive(ref.get(name)) for name in claimed)
        positives += len(claimed)
        hallucinated += wrong
        reports_hit += wrong > 0
    return {
        "hallucination_rate": hallucinated / positives if positives else 0.0,
        "reports_with_hallucination": reports_hit / len(ref_labels) if ref_labels else 0.0,
        "generated_positives": float(positives),
    }


# --- laterality --------------------------------------------------------------------------------------------------

# Sided findings, by CheXpert observation; parenchymal opacities share one group, so "right lower lobe
# consolidation" against "left lower lobe opacity" is a laterality error.
SIDED_GROUPS = {
    "Pleural Effusion": "effusion", "Pneumothorax": "pneumothorax", "Lung Opacity": "opacity",
    "Consolidation": "opacity", "Pneumonia": "opacity", "Lung Lesion": "nodule/mass", "Atelectasis": "atelectasis",
    "Pleural Other": "pleural thickening", "Fracture": "fracture",
}
LEFT, RIGHT, BILATERAL = "left", "right", "bilateral"
_SIDE_WORD = re.compile(
    r"\b(?:(?P<bilateral>(?:left|right)\s+(?:greater|more|larger)\s+than\s+(?:left|right)|bilateral\w*|"
    r"bi(?:basilar|basal|apical|lateral)|both)|(?P<left>left)|(?P<right>right))\b"
)
_REST_OF_WORD = re.compile(r"[\w-]*")
_PREPOSITION_THEN_SIDE = re.compile(
    r"^\s*(?:(?:is|are|seen|noted|present)\s+)?(?:in|at|on|of|within|involving|along|over|overlying|projecting\s+over)"
    r"\s+(?:the\s+)?(?:[\w-]+\s+){0,2}?(?=left|right|bilateral|both)"
)


def laterality_error_rate(references: list[str], predictions: list[str]) -> dict[str, float]:
    """How often a sided finding is put on the wrong side.

    Each report yields (finding, side) pairs from its positive or uncertain (non-negated) mentions of a sided
    finding (``SIDED_GROUPS``), with the side taken from the words just before the mention ("small left pleural
    effusion", "right basilar", "bibasilar", "left-sided", an upper-case "L"/"R") or a prepositional phrase just
    after it ("effusion on the left", "opacity in the right lower lobe"). All mentions of one finding in a report
    merge: left and right together make bilateral. A finding is *compared* when both reference and prediction
    give it a side (``laterality_pairs``); ``laterality_error_rate`` is the share of compared findings where the
    prediction gives the opposite side (left for right or right for left) and ``laterality_correct_rate`` the
    share with the same side. Bilateral against one side is neither, so the two rates need not sum to 1. With
    nothing compared both rates are 0.0: read them with ``laterality_pairs``.
    """
    _check_lengths(references, predictions)
    labeler = _labeler()
    pairs = errors = correct = 0
    for reference, prediction in zip(references, predictions):
        ref_sides, pred_sides = sided_findings(labeler, reference), sided_findings(labeler, prediction)
        for finding in ref_sides.keys() & pred_sides.keys():
            pairs += 1
            pair = {ref_sides[finding], pred_sides[finding]}
            errors += pair == {LEFT, RIGHT}
            correct += len(pair) == 1
    return {
        "laterality_error_rate": errors / pairs if pairs else 0.0,
        "laterality_correct_rate": correct / pairs if pairs else 0.0,
        "laterality_pairs": float(pairs),
    }


def sided_findings(labeler: CheXpertLabeler, report: str) -> dict[str, str]:
    """{finding group: left | right | bilateral} for the positive or uncertain sided mentions of a report."""
    analyzed = labeler.analyze(report)
    sides: dict[str, set[str]] = {}
    for mention in analyzed.mentions:
        group = SIDED_GROUPS.get(mention.observation)
        if group is None or not is_positive(mention.label):
            continue
        side = mention_side(analyzed, mention)
        if side:
            sides.setdefault(group, set()).update((LEFT, RIGHT) if side == BILATERAL else (side,))
    return {group: BILATERAL if len(found) == 2 else next(iter(found)) for group, found in sides.items()}


def mention_side(report: LabeledReport, mention: Mention) -> str | None:
    """The side a mention is put on: ``LEFT``, ``RIGHT``, ``BILATERAL``, or None when its clause names none.

    The closest side word in the 40 characters before the mention ("small left pleural effusion", "right basilar",
    "bibasilar", "left greater than right" is bilateral; an upper-case "L"/"R" was spelled out by the labeler), else
    a prepositional phrase within 50 characters after it ("effusion on the left", "opacity in the right lower
    lobe"); neither reaches past the mention's clause. ``mention`` must be one of ``report.mentions``: its positions
    index ``report.text``, the labeler's normalised text.
    """
    text, start, end, clause = report.text, mention.start, mention.end, mention.clause
    before = text[max(clause[0], start - 40): start]
    found = list(_SIDE_WORD.finditer(before))
    if found:
        return found[-1].lastgroup  # the closest side word before the mention
    end += _REST_OF_WORD.match(text, end).end() - end  # phrases are stems: "consolidat|ion in the right ..."
    after = text[end: min(clause[1], end + 50)]
    lead = _PREPOSITION_THEN_SIDE.match(after)
    if lead:
        side = _SIDE_WORD.match(after, lead.end())
        return side.lastgroup if side else None
    return None


@functools.cache
def _labeler() -> CheXpertLabeler:
    return CheXpertLabeler()


# --- helpers -----------------------------------------------------------------------------------------------------

def _counts(refs: Sequence[Labels], gens: Sequence[Labels], name: str) -> tuple[int, int, int]:
    tp = fp = fn = 0
    for ref, gen in zip(refs, gens):
        r, g = is_positive(ref.get(name)), is_positive(gen.get(name))
        tp += r and g
        fp += g and not r
        fn += r and not g
    return tp, fp, fn


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def _check_lengths(refs: Sequence, gens: Sequence) -> None:
    if len(refs) != len(gens):
        raise ValueError(f"{len(refs)} references but {len(gens)} predictions")
