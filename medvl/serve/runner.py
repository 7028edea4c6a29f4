"""What a Serve replica does with a batch of validated requests, free of Serve: load the model once, then turn
queries into answers (or into the RequestError that refuses just that query).

:class:`medvl.serve.app.MedvlServer` holds one of these; tests and tools can drive it in-process.
"""
from __future__ import annotations

import numpy as np
import torch

from medvl.data.records import SHARD_COLUMNS
from medvl.models.base import GenerationSettings
from medvl.models.registry import build_recipe
from medvl.serve.requests import Query, RequestError
from medvl.spec import JobSpec

ATTENTION_DECIMALS = 5


def serving_generation(spec: JobSpec) -> GenerationSettings:
    """``serve.num_beams`` / ``serve.max_new_tokens``, each falling back to eval's when 0."""
    return GenerationSettings(spec.serve.num_beams or spec.eval.num_beams,
                              spec.serve.max_new_tokens or spec.eval.max_new_tokens)


def shard_rows(queries: list[Query]) -> dict[str, np.ndarray]:
    """Queries as the shard rows every recipe's preprocessor takes; ``id`` is the position in the batch."""
    n = len(queries)
    values = {
        "id": [str(i) for i in range(n)], "group_id": [str(i) for i in range(n)], "split": ["serve"] * n,
        "image": [q.image for q in queries], "text": [""] * n, "question": [q.question for q in queries],
        "answer": [""] * n, "answer_type": [""] * n, "meta": ["{}"] * n,
    }
    out = {}
    for name in SHARD_COLUMNS:
        column = np.empty(n, dtype=object)  # bytes of unequal length stay objects, as Ray Data hands them over
        column[:] = values[name]
        out[name] = column
    return out


class ModelRunner:
    """One loaded model and the recipe that preprocesses, generates and (where it can) draws attention for it."""

    def __init__(self, spec: JobSpec, checkpoint: str):
        self.spec, self.checkpoint = spec, checkpoint
        self.recipe = build_recipe(spec)
        self.generation = serving_generation(spec)
        self.loaded = self.recipe.load_for_inference(checkpoint)
        self.device = torch.device("cuda" if spec.serve.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        if not spec.model.quantisation:  # bitsandbytes places 8- and 4-bit weights itself
            self.loaded.to(self.device)
        self.preprocess = self.recipe.preprocessor(checkpoint)

    @property
    def takes_question(self) -> bool:
        return self.recipe.task == "vqa"

    def run_batch(self, queries: list[Query]) -> list[dict | RequestError]:
        """Per query, its answer or the RequestError that refuses it (one bad image never fails the batch)."""
        with torch.inference_mode():
            batch = self.preprocess(shard_rows(queries))
            kept = [int(i) for i in batch["id"]]  # the preprocessor drops rows whose image does not decode
            results: list[dict | RequestError] = [
                RequestError(400, "not_an_image", "the image could not be decoded (corrupt or truncated file)",
                             field="image")
            ] * len(queries)
            if not kept:
                return results
            tensors = {name: torch.as_tensor(batch[name]).to(self.device) for name in self.recipe.tensor_columns}
            generated = self.recipe.generate_scored(self.loaded, tensors, self.generation)
            maps = self.attention([queries[i].attention for i in kept], tensors, generated.texts)
            for row, i in enumerate(kept):
                results[i] = {"text": generated.texts[row], "mean_token_prob": generated.mean_token_probs[row],
                              "batch_size": len(queries)}
                if queries[i].attention:
                    results[i] = maps[row] if isinstance(maps[row], RequestError) else {**results[i], **maps[row]}
        return results

    def attention(self, wanted: list[bool], tensors: dict, texts: list[str]) -> list:
        """Per kept row: {"attention": ...} where asked for, a RequestError where the recipe has no map."""
        rows = [row for row, want in enumerate(wanted) if want]
        out: list = [None] * len(wanted)
        if not rows:
            return out
        index = torch.as_tensor(rows)
        maps = self.recipe.attention_maps(self.loaded, {k: v[index] for k, v in tensors.items()},
                                          [texts[row] for row in rows])
        for position, row in enumerate(rows):
            if maps is None:
                out[row] = RequestError(400, "attention_not_available", f"the {self.spec.model.recipe} recipe "
                                        "gives no cross-attention map: send the request without \"attention\"",
                                        field="attention")
            else:
                grid = np.asarray(maps[position], dtype=np.float64)
                out[row] = {"attention": {"rows": grid.shape[0], "cols": grid.shape[1],
                                          "map": np.round(grid, ATTENTION_DECIMALS).tolist()}}
        return out
