"""An offline, rule-based CheXpert labeler: 14 observations from free-text chest X-ray reports.

Follows the CheXpert labeler (Irvin et al., AAAI 2019) in three stages (mention extraction, classification,
aggregation) on its own phrase lists (``phrases/mention``, ``phrases/unmention``, MIT), but without a dependency
parser. The original classifies each mention with NegBio's dependency-graph patterns (``phrases/patterns``), which
needs the BLLIP parser and the Stanford converter: slow, hard to install and not runnable offline here. Those
patterns are translated into surface rules over the clause that holds the mention:

* A *clause* ends at sentence punctuation, ``;``, ``:``, a paragraph break, and "but", "however", "although",
  "though", "whereas", "except". Nothing reaches across a clause end.
* A cue either looks forward ("no", "without", "negative for", "may", "possible" ...: the mention follows it) or
  backward ("has resolved", "is not seen", "cannot be excluded": the mention precedes it). A forward scope also
  stops at a softer break ("with", "which", ", the", "and there", "there is", a comma or "and" after a verb,
  ", small/left/new ..."), so a negated list ("no A, B, or C") is negated as a whole while "no A, small B" is
  not. A backward scope stops at another copula, and crosses commas only in a list ("A, B, and C have resolved").
  A cue that takes a noun phrase ("removal of", "resolution of", "free of" ...) also reaches a conjunct "and the /
  left / right / bilateral B" that has no verb of its own ("removal of the tube and right catheter", not "... and
  the right catheter remains"), where after "no" that "and" ends the scope ("no A and left B" states B).
  "or" and "versus" make their immediate neighbours uncertain (NegBio's ``conj:or`` / ``conj:versus``).
* Precedence is NegBio's: pre-negation uncertainty ("cannot exclude", "not excluded", "not well seen") beats
  negation, which beats uncertainty. Mentions in scope of no cue are positive.
* Phrases naming a *structure* rather than a finding ("the heart", "heart size", "cardiac silhouette",
  "mediastinum", "contour" ...) need a size statement: "enlarged", "prominent", "widened" make them positive,
  "normal", "unremarkable", "within normal limits", "not enlarged" negative, "borderline" uncertain; with none
  ("pacer leads over the heart", "the heart size is stable") they are not a mention at all. The original labels
  every such phrase positive unless negated.

Deliberate departures from the original, each to match how people label reports:

* Supplementary phrases (``_EXTRA_MENTIONS``/``_EXTRA_UNMENTIONS``) for wording the lists miss or over-match:
  "wires", "port", "clips", "leads", "generator", "stimulator", "sutures", "implants", a tip at the SVC / atrium /
  carina (devices, the last one whatever its redacted name); "widened mediastinum"; "interstitial prominence"
  (opacity); "hyperexpanded", "tortuous", "pericardial effusion" (other findings); "plate-like atelectasis" and
  "endplate" are not a device plate, "tuberculosis" not a tube, Kerley / B-lines not lines, "supporting" not a
  support, subcutaneous edema not pulmonary edema, cystic fibrosis not pleural. As in the original lists (and as
  the IU X-ray indexers code them), a deformity is not a fracture, "sternotomy" alone is a procedure, not a
  device, and a blunted costophrenic angle is another finding, not an effusion (benchmarks/labeler_agreement.py
  measured each of these three the other way round as a loss against human labels).
* "stable/unchanged silhouette" and "no new X" are not uncertain (the original made them -1); "no change in X"
  leaves X positive; a positive "CHF" does not add an uncertain Cardiomegaly.
* Sections headed INDICATION, HISTORY, COMPARISON, TECHNIQUE, EXAMINATION, NOTIFICATION, RECOMMENDATION(S) or WET
  READ are dropped ("evaluate for pneumonia" is not a finding); FINDINGS and IMPRESSION are both kept (the
  original labels the impression only). Text without headers is labelled whole.
* The original's ``no_finding.txt`` lists *other findings* (emphysema, scoliosis, granuloma, ...). As there, a
  positive or uncertain mention of one rules out No Finding but is not reported. Support devices never do.

Aggregation per report, as in the original: positive (1.0) over uncertain (-1.0) over negative (0.0); blank (None)
when never mentioned. No Finding is 1.0 iff no observation other than Support Devices, and no other finding, is
positive or uncertain; otherwise blank (never 0.0). A report that mentions nothing but has some text ("Normal
chest.", "No acute process.") gets No Finding 1.0, as the original does; an empty report (or one left empty once
the indication/history/comparison/technique sections are dropped) gets every column blank, so that an empty
generation is not scored as a normal study.

Speed: everything is compiled once, in ``__init__`` and at import. Each phrase carries a literal anchor and its
regex only runs on reports containing it (``anchor in text`` is far cheaper than a 70-way regex alternation, which
``re`` tries at every character); all cues are found in one pass of one regex with a single leading ``\b``; scopes
are then resolved by position. About 2,000 reports/s on one core (``benchmarks/chexpert_throughput.py``).
"""
from __future__ import annotations

import bisect
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

OBSERVATIONS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Lesion", "Lung Opacity", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices",
)
CE5: tuple[str, ...] = ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion")
NO_FINDING, SUPPORT_DEVICES = OBSERVATIONS[0], OBSERVATIONS[-1]
OTHER_FINDING = "Other Finding"  # phrases/mention/no_finding.txt: findings outside the 14 that rule out No Finding

POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0
PHRASE_DIR = Path(__file__).parent / "phrases"

# Mention kinds: a finding, a structure that needs a size statement, a descriptor that "normal" can negate
# ("interstitial markings are normal"), and a finding the original always calls uncertain ("vascular congestion").
FINDING, STRUCTURE, DESCRIPTOR, HEDGED = "finding", "structure", "descriptor", "hedged"

_STRUCTURE_PHRASES = {
    "the heart", "heart size", "cardiac size", "cardiac shadow", "cardiac contour", "cardiac silhouette",
    "_mediastinum", "cardiomediastinum", "contour", "mediastinal configuration", "mediastinal silhouette",
    "pericardial silhouette", "cardiac silhouette and vascularity",
}
_DESCRIPTOR_PHRASES = {"interstitial marking", "interstitial pattern", "reticular pattern", "reticular marking"}
_HEDGED_PHRASES = {"vascular congestion", "pulmonary congestion", "indistinctness", "vascular prominence"}

# (kind, regex[, anchor]) added to the original lists; regexes run on the normalised (lower-case) text. The anchor
# is a literal every match contains (by default the regex's leading letters); see ``_anchor``.
_EXTRA_MENTIONS: dict[str, list[tuple[str, ...]]] = {
    "Enlarged Cardiomediastinum": [
        (FINDING, r"mediastinal\s+(?:widening|enlargement)"),
        (STRUCTURE, r"cardiomediastinal"),
    ],
    "Cardiomegaly": [(STRUCTURE, r"\bheart\b(?!\s+failure)")],
    "Lung Opacity": [
        (FINDING, r"ground[\s-]?glass"),
        (FINDING, r"interstitial\s+(?:prominence|thickening)"),  # the list's "interstitial marking", in other words
        (FINDING, (r"(?:patchy|hazy|streaky|airspace|air[\s-]space|alveolar|retrocardiac|ill[\s-]defined|basilar|"
                  r"basal|base|lobe|lung)\s+densit"), "densit"),
    ],
    "Edema": [(FINDING, r"kerley")],
    "Pneumothorax": [(FINDING, r"\bptx\b")],
    "Pleural Effusion": [(FINDING, r"hydropneumothora")],
    "Pleural Other": [
        (FINDING, r"pleural[\s-]+plaque"),
        (FINDING, r"pleur\w*[\s-]+parenchymal\s+scar"),
        (FINDING, r"pleural\s+calcifi"),
    ],
    "Fracture": [
        (FINDING, r"\bfx\b"),
        (FINDING, r"\bcallus"),
        (FINDING, r"healed\s+(?:[\w-]+\s+){0,2}?ribs?\b"),
        (FINDING, r"loss\s+of\s+(?:vertebral\s+(?:body\s+)?)?height"),
    ],
    "Support Devices": [
        (FINDING, p) for p in (
            r"wires?\b", r"\bclips?\b", r"\bstents?\b", r"\bport\b", r"port[\s-]?a[\s-]?cath",
            r"endotracheal", r"\bett\b", r"dobhoff", r"swan[\s-]?ganz", r"\becmo\b", r"\blvad\b", r"impella",
            r"prosthe(?:sis|ses|tic)", r"\bfilter\b", r"tracheostomy", r"\bsheath\b", r"\bshunt\b",
            r"\btip\b[^.;:]{0,60}?\b(?:svc|superior\s+vena\s+cava|cavoatrial|caval|right\s+atri\w*|carina)\b",
            r"\bleads\b(?!\s+to\b)", r"generator", r"stimulator", r"sutures?\b", r"\bimplants?\b",
        )
    ],
    OTHER_FINDING: [
        (FINDING, p) for p in (
            r"hyperexpan", r"tortuo", r"pericardial\s+effusion", r"adenopathy", r"bronchiectasis", r"osteophyt",
            r"elevated", r"pectus", r"chronic\s+obstructive", r"spondylo", r"flatten", r"hiatal", r"air\s+trapping",
            r"lobectomy", r"pneumonectomy", r"post[\s-]?surgical", r"post[\s-]?operative\s+change", r"mastectomy",
            r"hilar\s+(?:enlargement|fullness)", r"enlarged\s+hil", r"hypoinflat", r"under[\s-]?inflat",
        )
    ] + [  # low lung volumes: the list has the opposite, hyperinflation; a spine curved sideways is scoliosis
        (FINDING, r"\blow\s+(?:lung\s+)?volumes?"),
        (FINDING, r"volumes\s+(?:are\s+|remain\s+)?(?:low|reduced|diminished|decreased)"),
        (FINDING, r"(?:reduced|decreased|diminished)\s+lung\s+volumes?", "volume"),
        (FINDING, r"(?:dextro|levo)[\s-]?curvature", "curvature"),
    ],
}
_EXTRA_UNMENTIONS: dict[str, list[str]] = {
    "Support Devices": [
        r"tubercul", r"tuberos", r"guideline", r"outline", r"midline", r"kerley\s+(?:[a-z]\s+)?lines?",
        r"septal\s+lines?", r"pleural\s+lines?", r"\bb[\s-]lines?", r"plate[\s-]?like", r"end[\s-]?plates?",
        r"support(?:ive|ing)", r"nipple\s+markers?",
        r"valve\s+(?:annul|calcif)", r"(?:aortic|mitral)\s+(?:valve\s+)?(?:annul\w*\s+)?calcif",
        r"calcifi\w*\s+(?:of\s+)?(?:the\s+)?(?:aortic|mitral)\s+valve",
    ],
    "Lung Opacity": [r"pleur\w*[\s-]+parenchymal\s+scar"],
    "Lung Lesion": [r"mass\s+effect"],
    "Enlarged Cardiomediastinum": [r"hilar\s+contour"],
    "Pneumonia": [r"(?:prior|previous|old|remote|healed|chronic|granulomatous)\s+(?:[\w-]+\s+)?infect"],
    "Edema": [r"(?:subcutaneous|soft[\s-]tissue)\s+edema"],
    "Pleural Other": [r"cystic\s+fibrosis"],
}


def _alternation(patterns: Iterable[str]) -> str:
    # Longest first, so that at one position "cardiac silhouette and vascularity" wins over shorter phrases.
    return "|".join(sorted(set(patterns), key=len, reverse=True))


def phrase_regex(phrase: str) -> str:
    """A phrase-list line as a regex. Like the original, a phrase matches anywhere ("effusion" in "effusions",
    "icd" in "aicd"); a leading or trailing ``_`` (the original's literal space) becomes a word boundary."""
    words = phrase.strip().lower()
    core = r"[\s-]+".join(re.escape(w) for w in words.strip("_").split())
    return (r"\b" if words.startswith("_") else "") + core + (r"\b" if words.endswith("_") else "")


def _phrase_kind(phrase: str) -> str:
    phrase = phrase.strip().lower()
    if phrase in _STRUCTURE_PHRASES:
        return STRUCTURE
    if phrase in _DESCRIPTOR_PHRASES:
        return DESCRIPTOR
    return HEDGED if phrase in _HEDGED_PHRASES else FINDING


def _read_phrases(phrase_dir: Path, kind: str, observation: str) -> list[str]:
    stem = "no_finding" if observation == OTHER_FINDING else observation.lower().replace(" ", "_")
    path = phrase_dir / kind / f"{stem}.txt"
    if not path.is_file():
        return []
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass(frozen=True)
class _Phrase:
    anchor: str  # a literal in every match: the regex only runs on reports that contain it
    pattern: re.Pattern
    kind: str


def _anchor(pattern: str) -> str:
    """The literal letters a regex starts with ("wires?\\b" -> "wire"), for the cheap ``anchor in text`` test."""
    letters = re.match(r"(?:\\b)?([a-z]+)([?*{]?)", pattern)
    anchor = letters.group(1)[: -1 if letters.group(2) else None] if letters else ""
    if len(anchor) < 2:
        raise ValueError(f"give {pattern!r} an explicit anchor")
    return anchor


def _mention_phrases(phrase_dir: Path, observation: str) -> list[_Phrase]:
    phrases = [(_phrase_kind(p), phrase_regex(p), p.strip().strip("_").split()[0].lower())
               for p in _read_phrases(phrase_dir, "mention", observation)]
    phrases += [(kind, pattern, anchor[0] if anchor else _anchor(pattern))
                for kind, pattern, *anchor in _EXTRA_MENTIONS.get(observation, [])]
    return [_Phrase(anchor, re.compile(pattern), kind) for kind, pattern, anchor in phrases]


def _unmention_regex(phrase_dir: Path, observation: str) -> re.Pattern | None:
    # From a word start, and not after "non-": "calcified nodule" is not a lesion, an "uncalcified nodule" is.
    patterns = [r"(?<!non-)\b" + phrase_regex(p) for p in _read_phrases(phrase_dir, "unmention", observation)]
    patterns += _EXTRA_UNMENTIONS.get(observation, [])
    return re.compile(_alternation(patterns)) if patterns else None


# --- text normalisation --------------------------------------------------------------------------------------

_DROPPED_SECTIONS = (
    "clinical indication", "indication", "clinical history", "clinical information", "history", "reason for exam",
    "reason for examination", "reason for study", "comparisons", "comparison", "technique", "type of examination",
    "examination", "exam", "procedure", "notification", "recommendations", "recommendation", "wet read",
)
_KEPT_SECTIONS = ("findings", "impression", "conclusions", "conclusion", "opinion", "summary", "final report",
                  "addendum", "report")
_SECTION_HEADER = re.compile(rf"\b({_alternation(_DROPPED_SECTIONS + _KEPT_SECTIONS)})\s*(?:\(s\))?\s*:")
_UPPER_SIDE = re.compile(r"(?<![\w/-])([LR])(?=\s+[A-Za-z])")
# (trigger, regex, replacement): a rewrite runs only on text containing its trigger, which saves most of the time.
_REWRITES = [(trigger, re.compile(p), r) for trigger, p, r in (
    ("/", r"\band\s*/\s*or\b", "or"), ("/", r"\bs/p\b", "status post"), ("/", r"\bw/o\b", "without"),
    ("/", r"\bw/", "with "), ("/", r"\br/o\b", "rule out"), ("/", r"\bb/l\b", "bilateral"),
    ("/", r"(?<=[a-z])/(?=[a-z])", " or "), ("vs.", r"\bvs\.", "versus"),
    (".", r"\b(e\.g|i\.e|dr|approx)\.", r"\1"), ("can", r"\bcan(?:\s+no|')t\b", "cannot"),
    ("\n", r"\n[ \t]*(?:\n|\d+[.)]\s|[-*\u2022]\s)", ". \n"),
)]
# Wording that contains a negation cue but asserts the finding is still there.
_CHANGE_WORDS = ("chang", "increas", "decreas", "worsen", "improv", "progress", "differen")
_NO_CHANGE = re.compile(
    r"\b(?:no|not|without)\s+(?:(?:significant(?:ly)?|appreciabl[ey]|substantial(?:ly)?|definite|major|interval|"
    r"other|further|much|notable|discernible|visible|radiographic|detectable|apparent|acute)\s+)*"
    r"(?:change[sd]?|increase|decrease|worsening|improvement|progression|difference)(?:\s+(?:in|of)\b)?")
_PARTIAL_RESOLUTION = re.compile(
    r"\b(?:partial(?:ly)?|incomplete(?:ly)?)\s+(?:resolved|resolution|cleared|clearing)(?:\s+of\b)?")


def normalize(report: str) -> str:
    """Lower-case report text with the history-like sections dropped and abbreviations spelled out."""
    text = _UPPER_SIDE.sub(lambda m: "left" if m.group(1) == "L" else "right", report).lower()
    for trigger, pattern, replacement in _REWRITES:
        if trigger in text:
            text = pattern.sub(replacement, text)
    if ":" in text:
        text = _drop_sections(text)
    if any(word in text for word in _CHANGE_WORDS):
        text = _NO_CHANGE.sub("stable", text)
    if "partial" in text or "incomplete" in text:
        text = _PARTIAL_RESOLUTION.sub("improved", text)
    return " ".join(text.split())


def _drop_sections(text: str) -> str:
    headers = list(_SECTION_HEADER.finditer(text))
    if not headers:
        return text
    kept = [text[: headers[0].start()]]
    for header, following in zip(headers, headers[1:] + [None]):
        if header.group(1) not in _DROPPED_SECTIONS:
            kept.append(". " + text[header.end(): following.start() if following else len(text)])
    return " ".join(kept)


# --- cues --------------------------------------------------------------------------------------------------------

_COPULA_REQUIRED = (r"(?:(?:is|are|was|were|has|have|had|appears?|remains?|seems?)\s+"
                    r"(?:now\s+|since\s+|also\s+|still\s+)?(?:been\s+)?)")
_COPULA = _COPULA_REQUIRED + "?"
_CLAUSE_END = re.compile(r"[.?!](?=\s|$)|[;:]|\b(?:but|however|although|though|whereas|except)\b")
_SEVERITY = (r"mild|mildly|moderate|moderately|severe|small|large|minimal|trace|tiny|new|stable|unchanged|persistent|"
             r"increased|decreased|improved|worsened|interval|left|right|bilateral")
_HARD_FORWARD_STOPS = (
    r"\b(?:with|which|who|while|besides|yet|otherwise|status\s+post|there\s+(?:is|are|has|have))\b",
    r",\s*(?:the|there|this|these|it|a|an|and\s+(?:the|there|a|an))\b",
    rf"\band\s+(?:the|there|a|an|is|are|{_SEVERITY})\b",
    # a verb, then a comma or "and": a new clause ("no effusion is seen and pneumothorax ...")
    (r"\b(?:is|are|was|were|seen|noted|identified|demonstrated|present|evident|appreciated|visualized)\b"
    r"[^,;]*?(?:,|\band\b)"),
)
# ", small B" ends "no A" ("no effusion, small pneumothorax") unless a negated list closes later with "or"/"nor"
# ("no consolidation, large effusion, or pneumothorax": every item is negated, as NegBio's conj rules do).
_LIST_ITEM_STOP = rf",\s*(?:{_SEVERITY})\b"
_HARD_FORWARD_STOP = re.compile("|".join(_HARD_FORWARD_STOPS))
_FORWARD_STOP = re.compile("|".join(_HARD_FORWARD_STOPS + (_LIST_ITEM_STOP,)))
_LIST_CLOSE = re.compile(r"\b(?:or|nor)\b")
# A conjunct "and the B", "and right B" (a hard stop after "no", where "no A and left B" states B), and what makes it
# a clause of its own rather than part of a preposition's object: a verb after it ("and the catheter remains").
# "and a", "and small" stay stops: "removal of the chest tube and small residual pneumothorax" states it.
_CONJUNCT = re.compile(r"(?:,\s*)?\band\s+(?:the|left|right|bilateral)\b")
_CONJUNCT_VERB = re.compile(
    r"(?P<verb>\b(?:is|are|was|were|has|have|had|remains?|persists?|seen|noted|identified|demonstrated|present|"
    r"evident|appreciated|visualized|in\s+place|unchanged|stable)\b)|" + _HARD_FORWARD_STOP.pattern)
_WITH_AFTER_HEDGE = re.compile(r"(?:\s+with\b)?")
_BACKWARD_STOP = re.compile(r"\b(?:is|are|was|were|has|have|had|there|which|who)\b|\band\s+(?:the|there)\b")
_LIST_WORD = re.compile(r",|\band\b")
_LIST_AFTER_LAST_COMMA = re.compile(r",[^,]*\b(?:and|or)\b[^,]*$")

FORWARD, BACKWARD, BOTH = "forward", "backward", "both"
PRE_NEGATION_UNCERTAINTY, NEGATION = "pre-negation uncertainty", "negation"
NORMAL, UNCERTAINTY = "normal", "uncertainty"


@dataclass(frozen=True)
class Cue:
    family: str
    patterns: tuple[str, ...]  # alternatives, each matched from a word start (the \b is added once for all)
    direction: str
    max_chars: int = 400
    tight: bool = False  # forward scope may not cross a comma or "and" ("resolved effusion", not a list)
    adjacent: bool = False  # scope may not cross another cue: "or" joins its neighbours, not "opacity may be A or B"
    coordinated: bool = False  # forward scope crosses "and the/left/right/bilateral" into a conjunct without a verb


# In precedence order: all cues are found in one pass, and where two match at one position the first wins
# ("not excluded" is uncertainty, not "not"; "no longer seen" looks backward, "no" forward).
_CUES = (
    Cue(PRE_NEGATION_UNCERTAINTY, (
        (rf"{_COPULA}(?:cannot|could\s+not|couldn't|unable\s+to|difficult\s+to|hard\s+to|not\s+possible\s+to)\s+"
        r"(?:be\s+)?(?:\w+ly\s+)?(?:exclude[ds]?|rule[ds]?\s+out|ruled\s+out)\b"),
        rf"{_COPULA}not\s+(?:been\s+)?(?:\w+ly\s+)?(?:excluded|ruled\s+out)\b",
        (rf"{_COPULA}not\s+(?:well|clearly|optimally|adequately|fully|entirely|completely)[\s-]+"
        r"(?:seen|visualized|evaluated|assessed|excluded|imaged|characterized)\b"),
        rf"{_COPULA}poorly\s+(?:seen|visualized|evaluated|assessed)\b",
    ), BOTH),
    Cue(PRE_NEGATION_UNCERTAINTY, (r"not\s+clear\b", r"unclear\b"), FORWARD),
    Cue(NEGATION, (
        (rf"{_COPULA}(?:no\s+longer|not)\s+(?:\w+ly\s+)?(?:seen|visualized|identified|present|evident|appreciated|"
        r"demonstrated|detected|noted|visible|apparent|depicted)\b"),
        rf"{_COPULA}gone\b",
    ), BACKWARD, 80),
    Cue(NEGATION, (
        (rf"{_COPULA}(?:completely\s+|nearly\s+|essentially\s+|almost\s+|largely\s+|now\s+)?"
        r"(?:resolved|cleared|removed|disappeared|withdrawn|absent|excluded|ruled\s+out)\b"),
    ), BOTH, 80, tight=True),
    Cue(NEGATION, (
        r"no\b", r"not\b", r"without\b", r"negative\s+for\b", r"neither\b",
        r"nor\b", r"rule\s+out\b", r"to\s+exclude\b", r"exclude\b", r"history\s+of\b",
        r"(?:evaluate|evaluation|assess|assessment|eval)\s+(?:for|of)\b",
    ), FORWARD),
    # "removal of A and the B": a preposition's object, so "and the/left/small B" is a conjunct of it.
    Cue(NEGATION, (
        r"free\s+of\b", r"clear\s+of\b", r"absence\s+of\b", r"resolution\s+of\b", r"clearing\s+of\b",
        r"removal\s+of\b", r"disappearance\s+of\b",
    ), FORWARD, coordinated=True),
    # "X is normal" negates structures and descriptors only: "cardiomegaly, lungs are normal" must not negate.
    Cue(NORMAL, (rf"{_COPULA}(?:\w+\s+)?(?:normal|unremarkable|within\s+(?:the\s+)?normal\s+limits)\b",),
        BACKWARD, 80),
    Cue(NORMAL, (r"(?:normal|unremarkable|normal[\s-]sized?)\b",), FORWARD, 30, tight=True),
    # "X is suspected" and "there is suspected X": the copula form takes the hedge word that the forward cue below
    # would have matched, so it looks both ways (tight: "there is likely atelectasis, and effusion" hedges one).
    Cue(UNCERTAINTY, (
        (rf"{_COPULA_REQUIRED}(?:(?:less\s+)?likely|possible|probable|suspected|questioned|questionable|unlikely|"
        r"considered|a\s+consideration|obscured|suspicious|uncertain|equivocal|indeterminate)\b"),
    ), BOTH, 80, tight=True),
    Cue(UNCERTAINTY, (
        r"(?:may|might|could|can)\s+(?:also\s+|still\s+)?(?:be\s+)?(?:present|seen|exist|persist|remain)\b",
        rf"{_COPULA_REQUIRED}(?:(?:in|within|on)\s+the\s+differential|a\s+differential\s+consideration)\b",
    ), BACKWARD, 80),
    Cue(UNCERTAINTY, (
        r"(?:may|might|could|would|maybe|perhaps)\b", r"possibl[ey]\b", r"possibilit(?:y|ies)\b", r"probabl[ey]\b",
        r"(?:un)?likely\b",
        r"presum\w*", r"question\w*", r"suspici\w*", r"suspect\w*", r"concern\w*", r"worrisome\b", r"suggest\w*",
        r"consider\w*", r"differential\b", r"equivocal\b", r"indeterminate\b", r"uncertain\b", r"borderline\b",
        r"favou?r\w*", r"correlat\w*", r"secondary\s+to\b", r"obscur\w*", r"thought\s+to\b",
    ), FORWARD),
    Cue(UNCERTAINTY, (r"(?:or|versus|vs)\b",), BOTH, 30, adjacent=True),
)
_CUE_REGEX = re.compile(
    r"\b(?:" + "|".join(f"(?P<c{i}>{'|'.join(cue.patterns)})" for i, cue in enumerate(_CUES)) + ")"
)
_CUE_OF_GROUP = {f"c{i}": cue for i, cue in enumerate(_CUES)}
# A bare "normal" is found as the backward cue (its copula and adverb are optional), which hides the forward one at
# the same place: it reads both ways ("heart size normal", "normal interstitial markings").
_BACKWARD_NORMAL, _FORWARD_NORMAL = [cue for cue in _CUES if cue.family == NORMAL]
_BARE_NORMAL = re.compile(r"(?:normal|unremarkable)$")

_STRUCTURE_BEFORE = re.compile(
    r"\b(?:(?P<negative>normal|unremarkable|normal[\s-]sized?|top[\s-]normal)\s+(?:[\w-]+\s+){0,3}"
    r"|(?P<uncertain>borderline)\s+(?:[\w-]+\s+){0,2}"
    r"|(?P<positive>enlarged|enlargement\s+of|prominent|prominence\s+of|increased|widened|widening\s+of|large|"
    r"globular|abnormal|massive(?:ly)?)\s+(?:[\w-]+\s+){0,2})$"
)
_STRUCTURE_AFTER = re.compile(
    r"(?P<negative>\bnot\s+(?:[\w-]+\s+){0,2}?(?:enlarged|large|increased|widened|prominent|abnormal)\b|\bnormal\b|"
    r"\bunremarkable\b|\bwithin\s+(?:the\s+)?(?:normal\s+)?limits\b|\bno\s+(?:evidence\s+of\s+)?enlargement\b)"
    r"|(?P<uncertain>\bborderline\b|\b(?:possibly|questionably|probably|likely|may\s+be|might\s+be|could\s+be|perhaps)"
    r"\s+(?:\w+ly\s+)?(?:enlarged|large|increased|widened|prominent)\b)"
    r"|(?P<positive>\b(?:enlarged|enlargement|large|increased|prominent|widened|widening|big|globular|abnormal|"
    r"massive(?:ly)?)\b)"
)
_STRUCTURE_WINDOW_END = re.compile(r",|\b(?:with|which|and\s+(?:the|there|a|an))\b")
_LABEL_OF = {"negative": NEGATIVE, "uncertain": UNCERTAIN, "positive": POSITIVE}


@dataclass(frozen=True)
class Mention:
    """One classified phrase match; ``start``/``end`` index ``LabeledReport.text`` (the normalised report)."""
    observation: str
    kind: str
    start: int
    end: int
    label: float
    clause: tuple[int, int]


@dataclass(frozen=True)
class LabeledReport:
    text: str
    mentions: list[Mention]
    labels: dict[str, float | None]


class CheXpertLabeler:
    """Labels reports with the 14 CheXpert observations (see the module docstring for the rules).

    Building one compiles every regex (a few ms); reuse it. Stateless after construction, so one instance can be
    shared across threads.
    """

    def __init__(self, phrase_dir: Path | str = PHRASE_DIR):
        observations = OBSERVATIONS[1:] + (OTHER_FINDING,)
        self._mentions = [(o, _mention_phrases(Path(phrase_dir), o)) for o in observations]
        self._unmentions = {o: _unmention_regex(Path(phrase_dir), o) for o in observations}

    def label(self, report: str) -> dict[str, float | None]:
        return self.analyze(report).labels

    def label_many(self, reports: Iterable[str]) -> list[dict[str, float | None]]:
        return [self.label(report) for report in reports]

    def analyze(self, report: str) -> LabeledReport:
        """Labels plus every classified mention, for metrics that need positions (laterality)."""
        text = normalize(report if isinstance(report, str) else "")  # None / NaN from a CSV: no report
        if not text.strip(" ."):
            return LabeledReport(text, [], {name: None for name in OBSERVATIONS})
        mentions = self._classified_mentions(text)
        return LabeledReport(text, mentions, aggregate(mentions))

    def _classified_mentions(self, text: str) -> list[Mention]:
        found = self._find_mentions(text)
        if not found:
            return []
        ends = [(m.start(), m.end()) for m in _CLAUSE_END.finditer(text)]
        starts_of_ends = [s for s, _ in ends]
        cues = _Cues(text)
        mentions = []
        for observation, kind, start, end in found:
            i = bisect.bisect_left(starts_of_ends, end)
            clause = (ends[i - 1][1] if i else 0, ends[i][0] if i < len(ends) else len(text))
            label = cues.classify(kind, start, end, clause)
            if label is not None:
                mentions.append(Mention(observation, kind, start, end, label, clause))
        return mentions

    def _find_mentions(self, text: str) -> list[tuple[str, str, int, int]]:
        found = []
        for observation, phrases in self._mentions:
            matches = [(m.start(), m.end(), phrase.kind) for phrase in phrases if phrase.anchor in text
                       for m in phrase.pattern.finditer(text)]
            if not matches:
                continue
            unmention = self._unmentions[observation]
            excluded = [m.span() for m in unmention.finditer(text)] if unmention else []
            last_end = -1
            # As one alternation would: at each position the longest phrase, then on past its end.
            for start, end, kind in sorted(matches, key=lambda m: (m[0], m[0] - m[1])):
                if start >= last_end and not any(s < end and start < e for s, e in excluded):
                    found.append((observation, kind, start, end))
                    last_end = end
        # "defib" and "tracheostomy" are on both the device and the other-finding lists: a device is not a finding.
        devices = [(s, e) for o, _, s, e in found if o == SUPPORT_DEVICES]
        return [f for f in found
                if f[0] != OTHER_FINDING or not any(s < f[3] and f[2] < e for s, e in devices)]


class _Cues:
    """Every cue occurrence in one normalised report, found once, and the scope tests on them."""

    def __init__(self, text: str):
        self.text = text
        found: dict[str, list[tuple[Cue, int, int]]] = {
            PRE_NEGATION_UNCERTAINTY: [], NEGATION: [], NORMAL: [], UNCERTAINTY: []}
        for m in _CUE_REGEX.finditer(text):
            cue = _CUE_OF_GROUP[m.lastgroup]
            found[cue.family].append((cue, m.start(), m.end()))
            if cue is _BACKWARD_NORMAL and _BARE_NORMAL.match(m[0]):
                found[NORMAL].append((_FORWARD_NORMAL, m.start(), m.end()))
        self.pre_negation_uncertainty = found[PRE_NEGATION_UNCERTAINTY]
        self.negation = found[NEGATION]
        self.normal = found[NORMAL]
        self.uncertainty = found[UNCERTAINTY]

    def classify(self, kind: str, start: int, end: int, clause: tuple[int, int]) -> float | None:
        if self._in_scope(self.pre_negation_uncertainty, start, end, clause):
            return UNCERTAIN
        if self._in_scope(self.negation, start, end, clause):
            return NEGATIVE
        label = POSITIVE
        if kind in (STRUCTURE, DESCRIPTOR) and self._in_scope(self.normal, start, end, clause):
            return NEGATIVE
        if kind == STRUCTURE:
            label = self._size_statement(start, end, clause)
            if label is None or label == NEGATIVE:
                return label
        if kind == HEDGED or self._in_scope(self.uncertainty, start, end, clause):
            return UNCERTAIN
        return label

    def _in_scope(self, cues: list[tuple[Cue, int, int]], start: int, end: int, clause: tuple[int, int]) -> bool:
        for cue, cue_start, cue_end in cues:
            before = cue.direction != BACKWARD and clause[0] <= cue_start and cue_end <= start
            after = cue.direction != FORWARD and end <= cue_start < clause[1]
            if (before and self._forward_reaches(cue, cue_end, start, end, clause[1])) or (
                    after and self._backward_reaches(cue, end, cue_start)):
                if cue.adjacent and self._cue_between(*((cue_end, start) if before else (end, cue_start))):
                    continue
                return True
        return False

    def _cue_between(self, start: int, end: int) -> bool:
        return any(start <= s and e <= end for family in (self.negation, self.uncertainty, self.normal)
                   for _, s, e in family)

    def _forward_reaches(self, cue: Cue, cue_end: int, start: int, end: int, clause_end: int) -> bool:
        if start - cue_end > cue.max_chars:
            return False
        if cue.family == UNCERTAINTY:  # "possibly with mild edema": the hedge's own "with" does not end its scope
            cue_end += len(_WITH_AFTER_HEDGE.match(self.text, cue_end)[0])
        if self._stop_before(_FORWARD_STOP, cue_end, start, end) and not (
                cue.family == NEGATION and self._in_negated_list(cue_end, start, end, clause_end)) and not (
                cue.coordinated and self._in_coordinated_object(cue_end, start, end, clause_end)):
            return False
        return not (cue.tight and _LIST_WORD.search(self.text, cue_end, start))

    def _stop_before(self, stops: re.Pattern, begin: int, start: int, end: int) -> re.Match | None:
        """The first stop that starts after ``begin`` and before the mention; it may run into the mention: in "no
        effusion and the heart is enlarged" the stop "and the" ends inside the mention "the heart"."""
        stop = stops.search(self.text, begin, end)
        return stop if stop and stop.start() < start else None

    def _in_coordinated_object(self, cue_end: int, start: int, end: int, clause_end: int) -> bool:
        """Every stop between the cue and the mention is a conjunct ("and the", "and right"), and no verb follows
        the mention before the clause or a hard stop ends: "removal of A and the B", not "... and the B remains"."""
        if any(not _CONJUNCT.match(self.text, stop.start())
               for stop in _FORWARD_STOP.finditer(self.text, cue_end, end) if stop.start() < start):
            return False
        after = _CONJUNCT_VERB.search(self.text, end, clause_end)
        return not (after and after.lastgroup == "verb")

    def _in_negated_list(self, cue_end: int, start: int, end: int, clause_end: int) -> bool:
        """Only list-item stops (", large ...") lie between the cue and the mention, and the list closes with "or"
        / "nor" at or after the mention, before any hard stop."""
        if self._stop_before(_HARD_FORWARD_STOP, cue_end, start, end):
            return False
        close = _LIST_CLOSE.search(self.text, cue_end, clause_end)
        if close is None:
            return False
        if close.start() < start:  # the mention is the closing item itself, not something after the list
            return _FORWARD_STOP.search(self.text, close.end(), start) is None
        return _HARD_FORWARD_STOP.search(self.text, start, close.start()) is None

    def _backward_reaches(self, cue: Cue, end: int, cue_start: int) -> bool:
        span = self.text[end:cue_start]
        if len(span) > cue.max_chars or _BACKWARD_STOP.search(span):
            return False
        return "," not in span or bool(_LIST_AFTER_LAST_COMMA.search(span))

    def _size_statement(self, start: int, end: int, clause: tuple[int, int]) -> float | None:
        """How a structure mention is qualified: "enlarged heart", "heart size is normal"; None if it isn't."""
        before = _STRUCTURE_BEFORE.search(self.text, max(clause[0], start - 40), start)
        if before:
            return _LABEL_OF[before.lastgroup]
        window_end = min(clause[1], end + 80)
        stop = _STRUCTURE_WINDOW_END.search(self.text, end, window_end)
        after = _STRUCTURE_AFTER.search(self.text, end, stop.start() if stop else window_end)
        return _LABEL_OF[after.lastgroup] if after else None


def aggregate(mentions: Iterable[Mention]) -> dict[str, float | None]:
    """Per-report labels: positive over uncertain over negative; the No Finding rule (module docstring)."""
    labels: dict[str, float | None] = {name: None for name in OBSERVATIONS}
    other: float | None = None
    for mention in mentions:
        if mention.observation == OTHER_FINDING:
            other = _stronger(other, mention.label)
        else:
            labels[mention.observation] = _stronger(labels[mention.observation], mention.label)
    findings = [labels[name] for name in OBSERVATIONS[1:-1]] + [other]
    if not any(value in (POSITIVE, UNCERTAIN) for value in findings):
        labels[NO_FINDING] = POSITIVE
    return labels


_RANK = {None: 0, NEGATIVE: 1, UNCERTAIN: 2, POSITIVE: 3}


def _stronger(current: float | None, new: float) -> float:
    return new if _RANK[new] > _RANK[current] else current
