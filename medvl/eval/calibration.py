"""Is the model as sure as it is right? Expected calibration error of the confidence it gives its outputs.

The confidence of a generated text is its mean token probability (:mod:`medvl.models.scored_generation`).

* VQA (``vqa_ece``): one (confidence, correct) pair per question, correct = exact match after normalisation.
* Reports (``ce_finding_ece``): a generative report model scores tokens, not findings, so the confidence of
  every finding the CheXpert labeler reads as positive or uncertain in a generated report is that report's mean
  token probability; the finding is correct when the reference report has it positive or uncertain too. No
  Finding is left out, as in the hallucination rate. A per-sentence confidence would be sharper; this one is
  what every recipe exposes.

* Tokens (``token_ece``): under teacher forcing, every reference token is one (confidence, correct) pair: the
  largest softmax probability at its position, correct when that argmax is the reference token.

Temperature scaling (Guo et al., 2017) divides every logit by one scalar T per model. It never changes which
token is likeliest (nor what beam search chooses), only how sure the model says it is. T is fitted on the
validation split by minimising the NLL of the reference tokens; the search runs over a grid of log T (5 %
steps, T in [0.22, 4.5]) so the split streams through the model once and no [tokens × vocabulary] matrix is
kept (a real vocabulary is 30-50k wide). T lives in ``calibration.json`` beside the model's weights
(:data:`medvl.runs.CALIBRATION_FILE`); eval and serve divide the scores of what they generate by it.

ECE uses ``bins`` equal-width bins over [0, 1]: the sample-weighted mean of |accuracy − mean confidence| per bin
(Guo et al., 2017). 0 is perfectly calibrated; a model that is always 90 % sure and right half the time scores 0.4.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medvl.eval.chexpert import OBSERVATIONS
from medvl.eval.clinical_metrics import Labels, is_positive
from medvl.runs import CALIBRATION_FILE

LOG_TEMPERATURE_GRID = tuple(round(-1.5 + 0.05 * i, 2) for i in range(61))  # includes 0.0: T = 1


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


# --------------------------------------------------------------------------------------------- temperature


@dataclass
class TokenScores:
    """Teacher-forced scores of reference tokens at a few temperatures, gathered batch by batch.

    ``nll[g]``: summed NLL of every reference token under ``softmax(logits / temperatures[g])``;
    ``confidences[g]``: each token's top softmax probability at that temperature; ``correct``: argmax == token
    (the same at every temperature).
    """

    temperatures: tuple[float, ...]
    nll: list[float] = field(default_factory=list)
    confidences: list[list[float]] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.nll = [0.0] * len(self.temperatures)
        self.confidences = [[] for _ in self.temperatures]

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """``logits``: [tokens, vocabulary] at the positions that predict ``targets`` [tokens]."""
        logits = logits.detach().to(torch.float32)
        self.correct += (logits.argmax(-1) == targets).tolist()
        for g, temperature in enumerate(self.temperatures):
            log_probs = torch.log_softmax(logits / temperature, dim=-1)
            self.nll[g] += float(-log_probs.gather(1, targets[:, None]).sum())
            self.confidences[g] += log_probs.max(-1).values.exp().tolist()

    @property
    def tokens(self) -> int:
        return len(self.correct)

    def ece(self, temperature: float) -> float:
        return expected_calibration_error(self.confidences[self.temperatures.index(temperature)], self.correct)

    def mean_nll(self, temperature: float) -> float:
        return self.nll[self.temperatures.index(temperature)] / max(self.tokens, 1)

    def best_temperature(self) -> float:
        """The temperature of least NLL (1.0 with no tokens)."""
        if not self.tokens:
            return 1.0
        return self.temperatures[int(np.argmin(self.nll))]


def grid_scores() -> TokenScores:
    return TokenScores(tuple(float(np.exp(log_t)) for log_t in LOG_TEMPERATURE_GRID))


def fit_temperature(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, TokenScores]:
    """The temperature that minimises the reference tokens' NLL over ``batches`` of (logits, targets)."""
    scores = grid_scores()
    for logits, targets in batches:
        scores.add(logits, targets)
    return scores.best_temperature(), scores


def token_calibration(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], temperature: float) -> dict[str, float]:
    """Token-level ECE and NLL of ``batches`` before (T = 1) and after dividing the logits by ``temperature``."""
    scores = TokenScores((1.0, temperature) if temperature != 1.0 else (1.0,))
    for logits, targets in batches:
        scores.add(logits, targets)
    return {"token_ece_before": scores.ece(1.0), "token_ece_after": scores.ece(temperature),
            "token_nll_before": scores.mean_nll(1.0), "token_nll_after": scores.mean_nll(temperature),
            "temperature": float(temperature), "calibration_tokens": float(scores.tokens)}


def read_temperature(model_folder: str | Path) -> float | None:
    """The temperature saved beside a local model folder's weights, None when it has none."""
    path = Path(model_folder) / CALIBRATION_FILE
    if not path.is_file():
        return None
    return float(json.loads(path.read_text())["temperature"])


def calibration_record(temperature: float, fitted: TokenScores, split: str) -> str:
    """What ``calibration.json`` holds: the temperature and what it was fitted on."""
    return json.dumps({"temperature": temperature, "fitted_on": split, "tokens": fitted.tokens,
                       "nll_before": fitted.mean_nll(1.0), "nll_after": fitted.mean_nll(temperature),
                       "ece_before": fitted.ece(1.0), "ece_after": fitted.ece(temperature)}, indent=2)
