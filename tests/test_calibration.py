"""Expected calibration error against hand-computed values, for VQA answers and for report findings."""
from __future__ import annotations

import pytest

from medvl.eval.calibration import expected_calibration_error, finding_calibration, vqa_calibration


def test_ece_hand_computed_over_two_bins():
    # bin [0.2, 0.3): confidences 0.2, 0.2, one right → |0.5 − 0.2| = 0.3, weight 2/5
    # bin [0.9, 1.0]: 0.9, 0.9, 1.0, all right → |1 − 0.9333…| = 0.0667, weight 3/5
    ece = expected_calibration_error([0.2, 0.2, 0.9, 0.9, 1.0], [True, False, True, True, True], bins=10)
    assert ece == pytest.approx(2 / 5 * 0.3 + 3 / 5 * (1 - 2.8 / 3))


def test_ece_zero_when_confidence_matches_accuracy_and_large_when_overconfident():
    assert expected_calibration_error([0.75] * 4, [True, True, True, False]) == pytest.approx(0.0)
    assert expected_calibration_error([0.9] * 4, [True, False, True, False]) == pytest.approx(0.4)
    assert expected_calibration_error([], []) == 0.0
    with pytest.raises(ValueError):
        expected_calibration_error([0.5], [True, False])


def test_vqa_calibration_pairs_confidence_with_exact_match():
    scores = vqa_calibration([True, False], [0.8, 0.6])  # one bin each: |1 − 0.8| and |0 − 0.6|
    assert scores["vqa_ece"] == pytest.approx((0.2 + 0.6) / 2)
    assert scores["vqa_mean_confidence"] == pytest.approx(0.7)


def test_finding_calibration_scores_each_asserted_finding_with_its_report_confidence():
    refs = [{"Edema": 1.0, "Cardiomegaly": None}, {"Edema": 0.0, "Pleural Effusion": -1.0}]
    gens = [{"Edema": 1.0, "Cardiomegaly": 1.0, "No Finding": 1.0}, {"Pleural Effusion": 1.0, "Edema": 0.0}]
    # report 0 (0.9): Edema right, Cardiomegaly wrong (No Finding is not a finding);
    # report 1 (0.5): Pleural Effusion right (uncertain counts as positive); Edema negative, not asserted.
    scores = finding_calibration(refs, gens, [0.9, 0.5])
    assert scores["ce_findings_scored"] == 3
    assert scores["ce_finding_ece"] == pytest.approx(2 / 3 * abs(0.5 - 0.9) + 1 / 3 * abs(1.0 - 0.5))
