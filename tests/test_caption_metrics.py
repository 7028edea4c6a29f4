import math

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from medvl.eval import caption_metrics
from medvl.eval.caption_metrics import caption_scores, per_sample_cider, ptb_tokenize

REFS = [
    "The heart size is normal.",
    "The heart size is normal.",
    ["No pleural effusion.", "There is no effusion."],
    "Left lung nodule.",
]
PREDS = ["The heart is normal.", "A dog sat on the mat", "no effusion", ""]


class CountingMeteor(Meteor):
    """Meteor that records its constructions and the per-sample scores it returns."""

    instances: list["CountingMeteor"] = []

    def __init__(self):
        super().__init__()
        CountingMeteor.instances.append(self)

    def compute_score(self, gts, res):
        score, self.per_sample = super().compute_score(gts, res)
        return score, self.per_sample


@pytest.fixture(scope="module")
def scored_with_meteor():
    """The one call in this file that starts METEOR's JVM (7-12 s on 2 busy CPUs)."""
    CountingMeteor.instances = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(caption_metrics, "Meteor", CountingMeteor)
        scores = caption_scores(REFS, PREDS)
    return scores, list(CountingMeteor.instances)


@pytest.fixture(scope="module")
def scored():
    return caption_scores(REFS, PREDS, meteor=False)


def pycoco_tokenized(refs, preds):
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in ([r] if isinstance(r, str) else r)] for i, r in enumerate(refs)})
    res = tok.tokenize({i: [{"caption": p}] for i, p in enumerate(preds)})
    return gts, res


def test_bleu_rouge_cider_equal_pycocoevalcap_scorers(scored):
    scores = scored
    gts, res = pycoco_tokenized(REFS, PREDS)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert [scores[f"bleu_{n}"] for n in range(1, 5)] == pytest.approx(bleu)
    assert scores["cider"] == pytest.approx(Cider().compute_score(gts, res)[0])
    assert scores["rouge_l"] == pytest.approx(Rouge().compute_score(gts, res)[0])


@pytest.mark.slow
def test_meteor_starts_one_jvm_per_call_and_closes_it(scored_with_meteor):
    _, meteors = scored_with_meteor
    assert len(meteors) == 1
    assert meteors[0].meteor_p.poll() is not None


@pytest.mark.slow
def test_meteor_in_unit_interval_higher_for_better_prediction_zero_for_empty(scored_with_meteor):
    scores, meteors = scored_with_meteor
    good, bad, _, empty = meteors[0].per_sample
    assert 0 < scores["meteor"] <= 1
    assert good > bad
    assert empty == 0


@pytest.mark.slow
def test_meteor_call_has_the_same_other_scores(scored_with_meteor, scored):
    scores, _ = scored_with_meteor
    assert {k: v for k, v in scores.items() if k != "meteor"} == scored


def test_spice_missing_jars_reported_not_downloaded(scored):
    scores = scored
    if caption_metrics.spice_unavailable_reason() is None:
        pytest.skip("SPICE jars are installed here")
    assert "spice" not in scores
    assert "CoreNLP" in scores["spice_unavailable"]


def test_per_sample_cider_mean_is_corpus_cider(scored):
    scores = scored
    per_sample = per_sample_cider(REFS, PREDS)
    assert len(per_sample) == 4
    assert per_sample[3] == 0.0
    assert sum(per_sample) / 4 == pytest.approx(scores["cider"])


def test_bleu_1_hand_computed():
    # Sample 1: clipped unigram matches the:min(3, 2) + cat:1 = 3 of 4; sample 2: 2 of 2.
    # Corpus precision 5/6; lengths 6 vs 9 (closest refs) -> brevity penalty exp(1 - 9/6).
    refs, preds = ["the cat sat on the mat", "a small nodule"], ["the the the cat", "small nodule"]
    scores = caption_scores(refs, preds, meteor=False)
    assert scores["bleu_1"] == pytest.approx(5 / 6 * math.exp(1 - 9 / 6), rel=1e-6)
    assert "meteor" not in scores


def test_rouge_l_hand_computed_from_lcs():
    # LCS("the heart is not enlarged", "heart is enlarged today") = "heart is enlarged" = 3 tokens.
    p, r, beta = 3 / 4, 3 / 5, 1.2
    expected = (1 + beta**2) * p * r / (r + beta**2 * p)
    scores = caption_scores(["The heart is not enlarged."], ["Heart is enlarged today"], meteor=False)
    assert scores["rouge_l"] == pytest.approx(expected)


def test_identical_texts_give_bleu_4_one_and_cider_ten():
    texts = ["the heart is normal", "small left pleural effusion", "no acute cardiopulmonary disease"]
    scores = caption_scores(texts, texts, meteor=False)
    assert scores["bleu_4"] == pytest.approx(1.0)
    assert scores["rouge_l"] == pytest.approx(1.0)
    assert scores["cider"] == pytest.approx(10.0)
    # CIDEr's idf is log(#samples / df): with one sample every weight is 0.
    assert per_sample_cider(texts[:1], texts[:1]) == [0.0]


def test_ptb_tokenize_matches_pycocoevalcap_without_writing_temp_files():
    texts = ["The heart is Normal.", "", "No effusion, 3.5cm;\nleft-sided.", "It's (mild) -- ok...", "."]
    expected = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    assert ptb_tokenize(texts) == [expected[i][0] for i in range(len(texts))]
    assert ptb_tokenize(["a\r\nb", "c\u2028d", "e"]) == ["a b", "c d", "e"]


def test_mismatched_lengths_rejected():
    with pytest.raises(ValueError):
        caption_scores(["a b"], ["a b", "c"], meteor=False)


# --------------------------------------------------------------------------------------------- without Java

REPORT_TEXTS = ["The heart size is normal, there isn't any effusion.", "Left-sided pleural effusion; small (2 cm)",
                'No acute "cardiopulmonary" process.', "It's (mild) -- ok...", "Heart: enlarged. Lungs: clear!"]


def test_python_tokenize_matches_ptb_on_report_prose():
    from medvl.eval.caption_metrics import python_tokenize

    assert python_tokenize(REPORT_TEXTS) == ptb_tokenize(REPORT_TEXTS)


def test_without_java_every_other_score_is_there_and_meteor_says_why(monkeypatch, scored):
    monkeypatch.setattr(caption_metrics.shutil, "which", lambda name: None)
    scores = caption_scores(REFS, PREDS, java=False)
    assert "meteor" not in scores and "no java on PATH" in scores["meteor_unavailable"]
    assert "default-jre-headless" in scores["meteor_unavailable"]
    for key in ("bleu_1", "bleu_4", "rouge_l", "cider"):  # the Python tokenizer agrees with PTB on these texts
        assert scores[key] == pytest.approx(scored[key])


def test_eval_fails_before_generating_without_java_unless_told_not_to(monkeypatch):
    from medvl.eval.evaluate import java_reason
    from medvl.models.registry import build_recipe
    from medvl.spec import SpecError, parse_spec

    monkeypatch.setattr(caption_metrics.shutil, "which", lambda name: None)
    raw = {"name": "j", "output_dir": "/tmp/unused", "stages": ["eval"], "model": {"preset": "tiny"}}
    spec = parse_spec(raw)
    with pytest.raises(SpecError) as info:
        java_reason(spec, build_recipe(spec))
    message = str(info.value)
    assert message.startswith("eval.require_java: no java on PATH") and "eval.require_java: false" in message
    relaxed = parse_spec(raw | {"eval": {"require_java": False}})
    assert "no java" in java_reason(relaxed, build_recipe(relaxed))
    vqa = parse_spec(raw | {"model": {"recipe": "blip_vqa", "preset": "tiny"}, "data": {"task": "vqa"}})
    assert java_reason(vqa, build_recipe(vqa)) is None  # VQA metrics need no Java
