"""Structured findings of one generated chest X-ray report: the 14 CheXpert observations with how sure the model
was of the words that stated them, the side, and warnings a reader should see.

Statuses are exactly what the CheXpert labeler (``medvl chexpert``) gives the whole text: present (1.0), uncertain
(-1.0), absent (0.0); never-mentioned observations are left out. The rest is read sentence by sentence (the
labeler's mentions carry positions in its normalised text, not in the generated one, and a sentence maps back to
tokens simply):

* ``confidence``: the mean probability of the generated tokens of the sentences whose mention gave the status
  (``None`` when the token probabilities are not known).
* ``side``: left / right / bilateral from the words around those mentions (as the laterality metric reads them).
* ``warnings``: a finding stated both present and absent in one report; a finding put on the left and on the
  right in different sentences; a present finding stated with confidence under ``LOW_CONFIDENCE``.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from medvl.eval.chexpert import OBSERVATIONS, CheXpertLabeler
from medvl.eval.clinical_metrics import BILATERAL, LEFT, RIGHT, mention_side

STATUS = {1.0: "present", -1.0: "uncertain", 0.0: "absent"}
LOW_CONFIDENCE = 0.5
_SENTENCE = re.compile(r"[^.;!?\n]+[.;!?]*")


def structured_findings(labeler: CheXpertLabeler, text: str, token_probs: Sequence[float] = (),
                        token_ends: Sequence[int] = ()) -> dict:
    """``{"findings": {observation: {...}}, "warnings": [...]}`` for ``text``; ``token_ends[k]`` is where the
    k-th generated token ends in ``text`` and ``token_probs[k]`` its probability."""
    labels = labeler.label(text)
    stated: dict[str, list[tuple[float, str | None, float | None]]] = {}
    for match in _SENTENCE.finditer(text):
        analyzed = labeler.analyze(match.group())
        confidence = _mean_prob(token_probs, token_ends, match.start(), match.end())
        for mention in analyzed.mentions:
            if mention.observation in OBSERVATIONS:
                side = mention_side(analyzed, mention)
                stated.setdefault(mention.observation, []).append((mention.label, side, confidence))
    findings, warnings = {}, []
    for name in OBSERVATIONS:
        label = labels[name]
        if label is None:
            continue
        mentions = stated.get(name, [])
        giving = [m for m in mentions if m[0] == label]
        confidences = [c for _, _, c in giving if c is not None]
        sides = {s for _, s, _ in giving if s}
        side = BILATERAL if BILATERAL in sides or {LEFT, RIGHT} <= sides else next(iter(sides), None)
        confidence = round(sum(confidences) / len(confidences), 4) if confidences else None
        findings[name] = {"status": STATUS[label], "confidence": confidence, "side": side}
        if {m[0] for m in mentions} >= {1.0, 0.0}:
            warnings.append(f"{name} is stated both present and absent")
        if {LEFT, RIGHT} <= sides:
            warnings.append(f"{name} is stated on the left and on the right in different places")
        if label == 1.0 and confidence is not None and confidence < LOW_CONFIDENCE:
            warnings.append(f"{name} is stated present with low confidence ({confidence:.2f})")
    return {"findings": findings, "warnings": warnings}


def _mean_prob(probs: Sequence[float], ends: Sequence[int], start: int, end: int) -> float | None:
    """Mean probability of the tokens that end inside [start, end] (a token ending on a boundary belongs left)."""
    chosen = [p for p, e, previous in zip(probs, ends, [0, *ends]) if start <= e and previous < end and e > start]
    return sum(chosen) / len(chosen) if chosen else None
