"""Caption / report metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE where it can run), via pycocoevalcap.

Scores follow the COCO caption evaluation exactly (same PTB tokenisation, same scorers), so numbers are comparable
with published ones. BLEU is corpus-level; METEOR, ROUGE-L and CIDEr are means over samples. CIDEr is the
pycocoevalcap CIDEr (not CIDEr-D): its idf comes from the references of the scored set itself, so a single sample
always scores 0 and scores are only comparable across runs on the same evaluation set.

Costs and the design choices they drove:
- Tokenisation runs Stanford's PTBTokenizer (one JVM, ~0.3 s) once per call for references and predictions
  together. pycocoevalcap's own ``PTBTokenizer`` writes its input to a temp file inside the installed package,
  which fails on read-only installs; ``ptb_tokenize`` runs the same jar with the same flags and punctuation
  filter, but feeds text on stdin, so it needs no writable directory.
- METEOR starts a JVM (~6.5 s) when ``Meteor`` is constructed; it is built once per ``caption_scores`` call and
  shut down before returning (pycocoevalcap only closes it in ``__del__``). Pass ``meteor=False`` for cheap
  per-epoch validation: the ``meteor`` key is then left out.
- SPICE needs Stanford CoreNLP 3.6.0 jars that pycocoevalcap downloads on first use (~360 MB). We never trigger
  that download: SPICE runs only when the jars are already present, and otherwise the result says why in
  ``spice_unavailable``. (On Java 17 SPICE's ``-cache`` option is also known to fail; that error is reported the
  same way.)
- Per-sample CIDEr (for finding the worst examples) is a separate function, ``per_sample_cider``, so that
  ``caption_scores`` keeps one flat return type; it costs one more tokeniser run, no METEOR.
- Without Java (``java=False``, see :func:`java_unavailable_reason`) texts are tokenized by
  :func:`python_tokenize`, which follows the PTB rules that matter for these scores (lower case, punctuation
  split off and dropped, clitics such as "n't" kept apart); METEOR is left out and ``meteor_unavailable`` says
  why. Scores stay comparable within such runs, not exactly with published (PTB-tokenized) numbers.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer

References = Sequence[str | Sequence[str]]
Tokenized = dict[int, list[str]]

_PTB_JAR = os.path.join(os.path.dirname(ptbtokenizer.__file__), ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
_PTB_PUNCTUATION = frozenset(ptbtokenizer.PUNCTUATIONS)
_SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def caption_scores(
    references: References, predictions: Sequence[str], meteor: bool = True, java: bool = True
) -> dict[str, float | str]:
    """Corpus scores of ``predictions`` against ``references`` (one string or a list of strings per sample).

    Returns ``bleu_1``..``bleu_4``, ``meteor`` (unless ``meteor=False``), ``rouge_l``, ``cider``, and either
    ``spice`` or ``spice_unavailable`` (the reason). Empty predictions score 0. ``java=False``: no JVM is
    started (Python tokenization, ``meteor_unavailable`` instead of ``meteor``).
    """
    gts, res = _tokenize_pairs(references, predictions, java)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores: dict[str, float | str] = {f"bleu_{n}": float(b) for n, b in enumerate(bleu, start=1)}
    if meteor and java:
        scores["meteor"] = _meteor(gts, res)
    elif meteor:
        scores["meteor_unavailable"] = java_unavailable_reason() or "not run (java=False)"
    scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    scores["cider"] = float(Cider().compute_score(gts, res)[0])
    scores.update(_spice(gts, res) if java else {"spice_unavailable": "SPICE needs Java (not run)"})
    return scores


def per_sample_cider(references: References, predictions: Sequence[str], java: bool = True) -> list[float]:
    """CIDEr of each prediction, with idf over the whole set (their mean is ``caption_scores(...)["cider"]``)."""
    gts, res = _tokenize_pairs(references, predictions, java)
    return [float(s) for s in Cider().compute_score(gts, res)[1]]


def java_unavailable_reason() -> str | None:
    """Why METEOR and the PTB tokenizer cannot run here (no ``java`` on PATH), or None when they can."""
    if shutil.which("java") is None:
        return ("no java on PATH: METEOR and the PTB tokenizer are Java programs (install a headless JRE, e.g. "
                "apt-get install -y default-jre-headless)")
    return None


_PTB_CLITICS = re.compile(r"(?i)\b(\w+)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_WORDS = re.compile(r"[\w'-]+|[^\w\s]")
# PTB's names for brackets, lower-cased by -lowerCase (so pycocoevalcap's punctuation filter keeps them)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-", "\"": "''"}


def python_tokenize(texts: Sequence[str]) -> list[str]:
    """Lower-cased tokens joined by spaces, punctuation dropped: PTB's rules for plain prose, without a JVM."""
    out = []
    for text in texts:
        text = _PTB_CLITICS.sub(r"\1 \2", " ".join(text.lower().split()))
        tokens = (_BRACKETS.get(t, t) for t in _WORDS.findall(text))
        out.append(" ".join(t for t in tokens if t and t not in _PTB_PUNCTUATION))
    return out


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """Lower-cased PTB tokens joined by spaces, punctuation removed: pycocoevalcap's tokenisation, one JVM run."""
    if not texts:
        return []
    _require_java()
    # -preserveLines keeps one output line per input line; any line break inside a text would shift the rest.
    lines = "\n".join(" ".join(text.splitlines()) for text in texts)
    cmd = ["java", "-cp", _PTB_JAR, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
    proc = subprocess.run(cmd, input=lines.encode(), capture_output=True, check=True)
    out = proc.stdout.decode().split("\n")
    if len(out) < len(texts) or any(out[len(texts) :]):
        raise RuntimeError(f"PTB tokenizer returned {len(out)} lines for {len(texts)} texts")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in _PTB_PUNCTUATION) for line in out[: len(texts)]]


def spice_unavailable_reason() -> str | None:
    """Why SPICE cannot run here, or None when the CoreNLP jars it needs are installed."""
    from pycocoevalcap.spice import spice  # imports nothing that downloads

    lib = os.path.join(os.path.dirname(spice.__file__), "lib")
    missing = [jar for jar in _SPICE_JARS if not os.path.exists(os.path.join(lib, jar))]
    if missing:
        return f"SPICE needs Stanford CoreNLP 3.6.0 jars in {lib} (missing: {', '.join(missing)}); not downloaded"
    return None


def _tokenize_pairs(references: References, predictions: Sequence[str],
                    java: bool = True) -> tuple[Tokenized, Tokenized]:
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    if not predictions:
        raise ValueError("no predictions to score")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if any(not r for r in refs):
        raise ValueError("every sample needs at least one reference")
    tokenize = ptb_tokenize if java else python_tokenize
    tokens = iter(tokenize([t for r in refs for t in r] + list(predictions)))
    gts = {i: [next(tokens) for _ in r] for i, r in enumerate(refs)}
    res = {i: [next(tokens)] for i in range(len(predictions))}
    return gts, res


def _meteor(gts: Tokenized, res: Tokenized) -> float:
    with _meteor_jvm() as scorer:
        return float(scorer.compute_score(gts, res)[0])


@contextmanager
def _meteor_jvm() -> Iterator[Meteor]:
    _require_java()
    scorer = Meteor()
    try:
        yield scorer
    finally:
        scorer.meteor_p.stdin.close()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
        # A compute_score that raised leaves its lock held, and Meteor.__del__ would then block forever.
        if scorer.lock.locked():
            scorer.lock.release()


def _spice(gts: Tokenized, res: Tokenized) -> dict[str, float | str]:
    reason = spice_unavailable_reason()
    if reason is not None:
        return {"spice_unavailable": reason}
    from pycocoevalcap.spice.spice import Spice

    try:
        return {"spice": float(Spice().compute_score(gts, res)[0])}
    except (subprocess.CalledProcessError, OSError) as e:
        return {"spice_unavailable": f"SPICE failed: {e}"}


def _require_java() -> None:
    if shutil.which("java") is None:
        raise RuntimeError("caption metrics need a Java runtime on PATH (PTB tokenizer and METEOR are Java)")
