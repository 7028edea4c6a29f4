"""Medical VQA metrics: exact match, edit similarity and token F1 after normalisation, split closed/open.

Free-text generators rarely reproduce a gold answer verbatim ("Yes, it is." for "yes", "3.5 cm" for "3.5cm"), so
besides exact match we report two softer scores: normalised Levenshtein similarity (rapidfuzz) and SQuAD-style
token F1. All three compare ``normalize_answer`` forms.

Groups follow VQA-RAD's ``answer_type``: "closed" (mostly yes/no, some "left"/"axial"-style choices) and "open".
``vqa_yes_no_acc`` is the usual yes/no accuracy: only closed questions whose gold answer is yes or no count, and the
prediction is mapped to yes/no by its first word (``yes_no``), so "yes, there is" counts as yes.

A group with no questions has its keys left out (not NaN), so averaging result dicts across runs never mixes in
NaN; the ``vqa_n*`` counts are always present.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from rapidfuzz.distance import Levenshtein

ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split()
    )
}
YES_WORDS = frozenset({"yes", "yeah", "yep", "true", "correct"})
NO_WORDS = frozenset({"no", "nope", "not", "none", "false", "incorrect"})
ANSWER_TYPES = ("closed", "open")

_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")  # 1,000 -> 1000
_PUNCTUATION = re.compile(r"[^\w\s.]|_|(?<!\d)\.|\.(?!\d)")  # everything but word chars and decimal points


def normalize_answer(text: str) -> str:
    """Canonical form of an answer for comparison.

    Lower-cases; drops thousands separators ("1,000" -> "1000"); turns every other punctuation mark into a space,
    except a point between digits ("3.5" stays, so "3.5cm" and "3.5 cm" still differ only by a space);
    removes the articles a/an/the; maps whole-word numbers zero..twenty to digits ("one" -> "1"); collapses
    whitespace. Hyphenated and spaced forms therefore match ("x-ray" == "x ray", "t2-weighted" == "t2 weighted").
    """
    text = _DIGIT_COMMA.sub("", str(text).lower())  # str(): VQA-RAD has a few int answers
    words = _PUNCTUATION.sub(" ", text).split()
    return " ".join(NUMBER_WORDS.get(w, w) for w in words if w not in ARTICLES)


def yes_no(text: str) -> str | None:
    """"yes" or "no" from the first word of the normalised answer, or None when it is neither.

    Yes-words: yes, yeah, yep, true, correct. No-words: no, nope, not, none, false, incorrect ("none" answers
    "is there any ...?" questions). Anything else ("maybe", "left") maps to None and counts as wrong.
    """
    words = normalize_answer(text).split()
    if not words:
        return None
    if words[0] in YES_WORDS:
        return "yes"
    if words[0] in NO_WORDS:
        return "no"
    return None


def token_f1(answer: str, prediction: str) -> float:
    """SQuAD-style F1 of the normalised word multisets (1.0 when both are empty)."""
    gold, pred = normalize_answer(answer).split(), normalize_answer(prediction).split()
    if not gold or not pred:
        return float(gold == pred)
    overlap = sum((Counter(gold) & Counter(pred)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(gold)
    return 2 * precision * recall / (precision + recall)


def vqa_scores(answers: Sequence[str], predictions: Sequence[str], answer_types: Sequence[str]) -> dict[str, float]:
    """Accuracy, edit similarity and token F1 overall and per answer type, plus yes/no accuracy and counts.

    Keys: ``vqa_acc``, ``vqa_edit_sim``, ``vqa_token_f1`` and their ``_closed``/``_open`` variants,
    ``vqa_yes_no_acc``, and counts ``vqa_n``, ``vqa_n_closed``, ``vqa_n_open``, ``vqa_n_yes_no``. Answer types are
    "closed"/"open", case-insensitive and stripped. Keys of an empty group are left out.
    """
    if not len(answers) == len(predictions) == len(answer_types):
        raise ValueError(f"lengths differ: {len(answers)} answers, {len(predictions)} predictions, "
                         f"{len(answer_types)} answer types")
    types = [_answer_type(t) for t in answer_types]
    golds = [normalize_answer(a) for a in answers]
    preds = [normalize_answer(p) for p in predictions]
    per_sample = {
        "acc": [float(g == p) for g, p in zip(golds, preds)],
        "edit_sim": [Levenshtein.normalized_similarity(g, p) for g, p in zip(golds, preds)],
        "token_f1": [token_f1(g, p) for g, p in zip(golds, preds)],
    }
    groups = {"": range(len(types))} | {f"_{t}": [i for i, x in enumerate(types) if x == t] for t in ANSWER_TYPES}
    scores: dict[str, float] = {f"vqa_n{suffix}": len(idx) for suffix, idx in groups.items()}
    for suffix, idx in groups.items():
        if idx:
            scores |= {f"vqa_{name}{suffix}": _mean([values[i] for i in idx]) for name, values in per_sample.items()}

    yes_no_idx = [i for i, (t, g) in enumerate(zip(types, golds)) if t == "closed" and g in ("yes", "no")]
    scores["vqa_n_yes_no"] = len(yes_no_idx)
    if yes_no_idx:
        scores["vqa_yes_no_acc"] = _mean([float(yes_no(predictions[i]) == golds[i]) for i in yes_no_idx])
    return scores


def _answer_type(value: str) -> str:
    answer_type = value.strip().lower()
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"answer_type must be 'closed' or 'open', got {value!r}")
    return answer_type


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
