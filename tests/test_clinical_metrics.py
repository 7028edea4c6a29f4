"""Clinical-efficacy metrics against counts worked out by hand (in the comments)."""
from __future__ import annotations

import math

import pytest

from medvl.eval.chexpert import OBSERVATIONS, CheXpertLabeler
from medvl.eval.clinical_metrics import (
    clinical_efficacy, hallucination_rate, laterality_error_rate, mention_side, sided_findings,
)

NF, ECM, CM, LL, LO, ED, CO, PN, AT, PX, PE, PO, FR, SD = OBSERVATIONS


def row(**labels: float | None) -> dict[str, float | None]:
    short = {"NF": NF, "CM": CM, "ED": ED, "PE": PE, "AT": AT, "PX": PX, "SD": SD, "CO": CO}
    return {name: None for name in OBSERVATIONS} | {short[k]: v for k, v in labels.items()}


REFS = [row(CM=1.0, PE=-1.0), row(NF=1.0), row(ED=1.0, PE=0.0, SD=1.0)]
GENS = [row(CM=1.0, AT=-1.0), row(NF=1.0, PX=1.0), row(ED=-1.0, PE=1.0, SD=float("nan"))]
# Cells (ref, gen), uncertain = positive, blank/NaN = negative:
#   CM tp | PE fn (r1), fp (r3) | AT fp | NF tp | PX fp | ED tp | SD fn      -> 14: tp 3, fp 3, fn 2
#   CE5 (CM ED CO AT PE): CM tp, ED tp, AT fp, PE fn + fp                     -> 5:  tp 2, fp 2, fn 1
#   Macro 14 over the 7 observations with a positive: CM, NF, ED score 1; PE, AT, PX, SD score 0.
#   Macro 5 over CM, ED, AT, PE (Consolidation has none): 1, 1, 0, 0.


def test_clinical_efficacy_micro_and_macro():
    scores = clinical_efficacy(REFS, GENS)
    expected = {
        "ce_micro_precision_14": 3 / 6, "ce_micro_recall_14": 3 / 5, "ce_micro_f1_14": 2 * 0.5 * 0.6 / 1.1,
        "ce_macro_precision_14": 3 / 7, "ce_macro_recall_14": 3 / 7, "ce_macro_f1_14": 3 / 7,
        "ce_micro_precision_5": 2 / 4, "ce_micro_recall_5": 2 / 3, "ce_micro_f1_5": 4 / 7,
        "ce_macro_precision_5": 0.5, "ce_macro_recall_5": 0.5, "ce_macro_f1_5": 0.5,
    }
    assert scores.keys() == expected.keys()
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value), key


def test_clinical_efficacy_edge_cases():
    assert clinical_efficacy(REFS, REFS)["ce_micro_f1_14"] == 1.0
    empty = clinical_efficacy([row()], [row()])
    assert all(v == 0.0 for v in empty.values())  # no positive anywhere: zero_division=0
    with pytest.raises(ValueError, match="2 references but 1 predictions"):
        clinical_efficacy(REFS[:2], GENS[:1])


def test_hallucination_rate():
    refs = [row(CM=1.0, PE=0.0), row(NF=1.0), row(ED=-1.0)]
    gens = [row(CM=1.0, PE=1.0, AT=-1.0), row(NF=1.0), row(ED=1.0, SD=1.0)]
    # generated positives (No Finding excluded): CM ok, PE (ref 0) wrong, AT (ref blank) wrong, ED ok, SD wrong
    out = hallucination_rate(refs, gens)
    assert out["hallucination_rate"] == pytest.approx(3 / 5)
    assert out["reports_with_hallucination"] == pytest.approx(2 / 3)
    assert out["generated_positives"] == 5
    assert hallucination_rate([row(NF=1.0)], [row(NF=1.0)])["hallucination_rate"] == 0.0


@pytest.fixture(scope="module")
def labeler() -> CheXpertLabeler:
    return CheXpertLabeler()


@pytest.mark.parametrize("report, expected", [
    ("Small left pleural effusion.", {"effusion": "left"}),
    ("Left-sided pleural effusion and right basilar atelectasis.", {"effusion": "left", "atelectasis": "right"}),
    ("Bibasilar atelectasis.", {"atelectasis": "bilateral"}),
    ("Bilateral pleural effusions, left greater than right.", {"effusion": "bilateral"}),
    ("Opacity in the right lower lobe may represent pneumonia.", {"opacity": "right"}),
    ("R pneumothorax. No left effusion.", {"pneumothorax": "right"}),
    ("Small left effusion. Small right effusion.", {"effusion": "bilateral"}),
    ("Fracture of the left seventh rib.", {"fracture": "left"}),
    ("No pneumothorax. Pleural effusions.", {}),
])
def test_sided_findings(labeler, report, expected):
    assert sided_findings(labeler, report) == expected


def test_mention_side_reads_one_mention_within_its_clause(labeler):
    report = labeler.analyze("Small left effusion. Pneumothorax on the right. Bibasilar atelectasis. No consolidation.")
    sides = {mention.observation: mention_side(report, mention) for mention in report.mentions}
    # the side word comes before the mention or in a phrase after it; "bibasilar", within 40 characters before
    # "consolidation" but in the sentence before, does not reach it
    assert sides == {PE: "left", PX: "right", AT: "bilateral", CO: None}


def test_laterality_error_rate():
    references = [
        "Small left pleural effusion.",
        "Right lower lobe opacity may represent pneumonia.",
        "Bibasilar atelectasis. No pneumothorax.",
        "No pleural effusion.",
        "L pleural effusion.",
        "There is a nodule in the right upper zone.",
    ]
    predictions = [
        "Small right pleural effusion.",               # effusion left -> right: error
        "Consolidation in the right lower lobe.",      # opacity right = right: correct
        "Left basilar atelectasis. Left pneumothorax.",  # bilateral vs left: compared, neither; PTX negated in ref
        "Left pleural effusion.",                      # not in the reference: not compared
        "Effusion on the left.",                       # left = left: correct
        "There is a nodule in the left upper zone.",   # nodule right -> left: error
    ]
    out = laterality_error_rate(references, predictions)
    assert out == {"laterality_error_rate": 2 / 5, "laterality_correct_rate": 2 / 5, "laterality_pairs": 5.0}
    nothing = laterality_error_rate(["No effusion."], ["Heart is normal."])
    assert nothing["laterality_pairs"] == 0 and not math.isnan(nothing["laterality_error_rate"])
