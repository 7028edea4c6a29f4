"""Is the model as sure as it is right? Expected calibration error of the confidence it gives its outputs.

The confidence of a generated text is its mean token probability (:mod:`medvl.models.scored_generation`).

* VQA (``vqa_ece``): one (confidence, correct) pair per question, correct = exact match after normalisation.
* Reports (``ce_finding_ece``): a generative report model scores tokens, not findings, so the confidence of
  every finding the CheXpert labeler reads as positive or uncertain in a generated report is that report's mean
  token probability; the finding is correct when the reference report has it positive or uncertain too. No
  Finding is left out, as in the hallucination rate. A per-sentence confidence would be sharper; this one is
  what every recipe exposes.

ECE uses ``bins`` equal-width bins over [0, 1]: the sample-weighted mean of |accuracy − mean confidence| per bin
(Guo et al., 2017). 0 is perfectly calibrated; a model that is always 90 % sure and right half the time scores 0.4.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medvl.eval.chexpert import OBSERVATIONS
from medvl.eval.clinical_metrics import Labels, is_positive


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], bins: int = 10) -> float:
    """Sample-weighted mean over equal-width bins of |accuracy − mean confidence|; 0.0 with no samples."""
    if len(confidences) != len(correct):
        raise ValueError(f"{len(confidences)} confidences but {len(correct)} outcomes")
    if not len(confidences):
        return 0.0
    conf = np.clip(np.asarray(confidences, dtype=np.float64), 0.0, 1.0)
    hits = np.asarray(correct, dtype=np.float64)
    which = np.minimum((conf * bins).astype(int), bins - 1)  # a confidence of exactly 1.0 goes in the top bin
    error = 0.0
    for b in np.unique(which):
        members = which == b
        error += members.sum() * abs(hits[members].mean() - conf[members].mean())
    return float(error / len(conf))


def vqa_calibration(correct: Sequence[bool], confidences: Sequence[float]) -> dict[str, float]:
    return {"vqa_ece": expected_calibration_error(confidences, correct), "vqa_mean_confidence":
            float(np.mean(confidences)) if len(confidences) else 0.0}


def finding_calibration(ref_labels: list[Labels], gen_labels: list[Labels],
                        confidences: Sequence[float]) -> dict[str, float]:
    """ECE of the findings asserted in generated reports (see the module docstring)."""
    pairs = [(confidence, is_positive(ref.get(name)))
             for ref, gen, confidence in zip(ref_labels, gen_labels, confidences)
             for name in OBSERVATIONS[1:] if is_positive(gen.get(name))]
    return {"ce_finding_ece": expected_calibration_error([c for c, _ in pairs], [ok for _, ok in pairs]),
            "ce_findings_scored": float(len(pairs))}
