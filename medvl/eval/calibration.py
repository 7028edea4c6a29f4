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
steps, T in [0.22, 4.5]), so the split streams through the model once. Where the model runs (eval's actor pool,
on the accelerators) each batch is reduced to a :class:`TokenStats` table: the summed NLL and the binned
(count, confidence, hits) of the reference tokens at every grid temperature. The tables add up, the fit and the
ECE read them exactly, and what travels back to the driver is 61 × 31 floats per batch, not the
[tokens × vocabulary] logits (a real vocabulary is 30-50k wide). T lives in ``calibration.json`` beside the
model's weights (:data:`medvl.runs.CALIBRATION_FILE`); eval and serve divide the scores of what they generate
by it. Every recipe exposes its teacher-forced view (:meth:`medvl.models.base.Recipe.target_logits`: the
logits at exactly the positions its loss scores).

ECE uses ``bins`` equal-width bins over [0, 1]: the sample-weighted mean of |accuracy − mean confidence| per bin
(Guo et al., 2017). 0 is perfectly calibrated; a model that is always 90 % sure and right half the time scores 0.4.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medvl.eval.chexpert import OBSERVATIONS
from medvl.eval.clinical_metrics import Labels, is_positive
from medvl.runs import CALIBRATION_FILE

LOG_TEMPERATURE_GRID = tuple(round(-1.5 + 0.05 * i, 2) for i in range(61))  # includes 0.0: T = 1
ECE_BINS = 10


def binned(confidences: Sequence[float] | np.ndarray, correct: Sequence[bool] | np.ndarray,
           bins: int = ECE_BINS) -> np.ndarray:
    """[3, bins]: per equal-width bin over [0, 1], the sample count, the summed confidence and the summed hits.
    Additive over samples, so binned tables of batches add up to the table of their union."""
    conf = np.clip(np.asarray(confidences, dtype=np.float64), 0.0, 1.0)
    hits = np.asarray(correct, dtype=np.float64)
    which = np.minimum((conf * bins).astype(int), bins - 1)  # a confidence of exactly 1.0 goes in the top bin
    return np.stack([np.bincount(which, minlength=bins).astype(np.float64),
                     np.bincount(which, weights=conf, minlength=bins),
                     np.bincount(which, weights=hits, minlength=bins)])


def ece_of_bins(table: np.ndarray) -> float:
    """ECE of a :func:`binned` table: Σ_b |hits_b − confidence_b| / samples (= Σ_b n_b/N·|acc_b − conf_b|)."""
    samples = table[0].sum()
    return float(np.abs(table[2] - table[1]).sum() / samples) if samples else 0.0


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS) -> float:
    """Sample-weighted mean over equal-width bins of |accuracy − mean confidence|; 0.0 with no samples."""
    if len(confidences) != len(correct):
        raise ValueError(f"{len(confidences)} confidences but {len(correct)} outcomes")
    return ece_of_bins(binned(confidences, correct, bins)) if len(confidences) else 0.0


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
class TokenStats:
    """What the temperature fit and the token-level ECE need of teacher-forced reference tokens, at a few
    temperatures: additive, so each batch's table is computed where the model runs and the tables add up.

    ``table[g]`` (temperature ``temperatures[g]``): the summed NLL of every reference token under
    ``softmax(logits / T)``, then :func:`binned` (count, summed confidence, summed hits) of each token's top
    softmax probability against argmax == reference (the argmax is the same at every temperature). Exact for the
    fit and for the ECE: no [tokens × vocabulary] matrix and no per-token list leaves the worker
    (61 × 31 floats per batch on the grid).
    """

    temperatures: tuple[float, ...]
    table: np.ndarray  # [len(temperatures), 1 + 3 * bins] float64

    @classmethod
    def empty(cls, temperatures: Sequence[float], bins: int = ECE_BINS) -> TokenStats:
        return cls(tuple(float(t) for t in temperatures), np.zeros((len(temperatures), 1 + 3 * bins)))

    @classmethod
    def of(cls, logits: torch.Tensor, targets: torch.Tensor, temperatures: Sequence[float],
           bins: int = ECE_BINS) -> TokenStats:
        """``logits``: [tokens, vocabulary] at the positions that predict ``targets`` [tokens]."""
        stats = cls.empty(temperatures, bins)
        logits = logits.detach().to(torch.float32)
        targets = targets.to(logits.device)
        hits = (logits.argmax(-1) == targets).cpu().numpy()
        for g, temperature in enumerate(stats.temperatures):
            log_probs = torch.log_softmax(logits / temperature, dim=-1)
            stats.table[g, 0] = float(-log_probs.gather(1, targets[:, None]).double().sum())
            confidences = log_probs.max(-1).values.exp().cpu().double().numpy()
            stats.table[g, 1:] = binned(confidences, hits, bins).ravel()
        return stats

    @classmethod
    def from_flat(cls, temperatures: Sequence[float], flat: Sequence[float]) -> TokenStats:
        """The inverse of :attr:`flat` (one row of a Ray Data column)."""
        table = np.asarray(flat, dtype=np.float64).reshape(len(temperatures), -1)
        return cls(tuple(float(t) for t in temperatures), table)

    @property
    def flat(self) -> np.ndarray:
        return self.table.ravel()

    def __add__(self, other: TokenStats) -> TokenStats:
        if other.temperatures != self.temperatures:
            raise ValueError(f"token statistics at temperatures {other.temperatures} added to {self.temperatures}")
        return TokenStats(self.temperatures, self.table + other.table)

    def _bins(self, temperature: float) -> np.ndarray:
        return self.table[self.temperatures.index(temperature), 1:].reshape(3, -1)

    @property
    def tokens(self) -> int:
        return int(round(self.table[0, 1:].reshape(3, -1)[0].sum())) if len(self.temperatures) else 0

    def ece(self, temperature: float) -> float:
        return ece_of_bins(self._bins(temperature))

    def mean_nll(self, temperature: float) -> float:
        return float(self.table[self.temperatures.index(temperature), 0]) / max(self.tokens, 1)

    def best_temperature(self) -> float:
        """The temperature of least NLL (1.0 with no tokens)."""
        if not self.tokens:
            return 1.0
        return self.temperatures[int(np.argmin(self.table[:, 0]))]


def temperature_grid() -> tuple[float, ...]:
    return tuple(float(np.exp(log_t)) for log_t in LOG_TEMPERATURE_GRID)


def fit_temperature(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, TokenStats]:
    """The temperature that minimises the reference tokens' NLL over ``batches`` of (logits, targets), in process
    (eval fits the same :class:`TokenStats` in its actor pool: :func:`medvl.eval.evaluate.pooled_token_stats`)."""
    grid = temperature_grid()
    stats = TokenStats.empty(grid)
    for logits, targets in batches:
        stats += TokenStats.of(logits, targets, grid)
    return stats.best_temperature(), stats


def before_after(temperature: float) -> tuple[float, ...]:
    """The temperatures the token-level ECE is reported at: 1 (before) and the fitted one (after)."""
    return (1.0, float(temperature)) if temperature != 1.0 else (1.0,)


def token_metrics(stats: TokenStats, temperature: float) -> dict[str, float]:
    """Token-level ECE and NLL before (T = 1) and after dividing the logits by ``temperature``."""
    return {"token_ece_before": stats.ece(1.0), "token_ece_after": stats.ece(temperature),
            "token_nll_before": stats.mean_nll(1.0), "token_nll_after": stats.mean_nll(temperature),
            "temperature": float(temperature), "calibration_tokens": float(stats.tokens)}


def token_calibration(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], temperature: float) -> dict[str, float]:
    """:func:`token_metrics` of ``batches`` of (logits, targets), in process."""
    stats = TokenStats.empty(before_after(temperature))
    for logits, targets in batches:
        stats += TokenStats.of(logits, targets, stats.temperatures)
    return token_metrics(stats, temperature)


def read_temperature(model_folder: str | Path) -> float | None:
    """The temperature saved beside a local model folder's weights, None when it has none."""
    path = Path(model_folder) / CALIBRATION_FILE
    if not path.is_file():
        return None
    return temperature_of(path.read_text())


def temperature_of(record: str) -> float:
    """The temperature of a ``calibration.json`` text (see :func:`calibration_record`)."""
    return float(json.loads(record)["temperature"])


def calibration_record(temperature: float, fitted: TokenStats, split: str) -> str:
    """What ``calibration.json`` holds: the temperature and what it was fitted on."""
    return json.dumps({"temperature": temperature, "fitted_on": split, "tokens": fitted.tokens,
                       "nll_before": fitted.mean_nll(1.0), "nll_after": fitted.mean_nll(temperature),
                       "ece_before": fitted.ece(1.0), "ece_after": fitted.ece(temperature)}, indent=2)
