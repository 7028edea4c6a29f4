"""What a Serve replica does with a batch of validated requests, free of Serve: load the model once, then turn
queries into answers (or into the RequestError that refuses just that query), and say whether the model still
works.

:class:`medvl.serve.app.MedvlServer` holds one of these; tests and tools can drive it in-process.

Isolation (:meth:`ModelRunner.answer`). A batch is preprocessed and generated in one call. Requests are validated
before they join it (:mod:`medvl.serve.requests`), but should anything in the batch still raise (a tokenizer that
chokes on some text, an image decoder bug), the batch is answered again one query at a time: only the query that
fails alone gets a 500, every other query gets its answer. An image that does not decode is a 400 for its own
request either way (the preprocessor drops its row).

Health (:meth:`ModelRunner.check_health`). A query that fails alone may be the query's fault or the model's. It
marks the model *suspect*; the next health check (Ray Serve calls the deployment's ``check_health`` every few
seconds, ``/healthz`` calls it too) then generates from a blank image. If that fails as well the model is dead:
the check raises from then on and Serve replaces the replica. A healthy model is never probed, so the check
costs nothing while requests succeed.

Decoding. Every query is answered with the deployment's deterministic decoding (``serve.num_beams``: greedy or
beam search) unless it asks for a sampling temperature (``Query.temperature`` > 0, OpenAI's ``temperature``):
then it is sampled at that temperature (:func:`medvl.models.scored_generation.decoding`); queries of one batch
asking for different temperatures are generated in separate groups. A sampled query with a ``seed`` (OpenAI's) stays
in its batch, unlike a stream: its row draws from its own generator seeded with it (``decoding(seeds=…)``, one per
row; a loop over the batch's rows at each step, cheap beside the forward pass), so neither its neighbours in the
batch nor the requests before it change its draws. Generating it alone would buy only the last float bits of a
forward pass of one instead of a batch, which can flip a draw only where a token's cumulative probability falls
within rounding of the uniform number drawn: not worth giving up the batch for. The calibration temperature beside
the model only rescales the confidences reported, whatever the decoding. :meth:`ModelRunner.stream` answers one
query while handing its text out as the tokens are generated (:class:`medvl.models.scored_generation.PieceStreamer`).

Counters (:meth:`ModelRunner.stats`, shown by ``GET /v1/models``): how many times this process loaded a base
model, and how many adapters this runner loaded into it and dropped again, so that "the base is loaded once per
replica" can be checked on a live replica.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Callable

import numpy as np
import torch

from medvl.data.images import encode_png
from medvl.data.records import SHARD_COLUMNS
from medvl.eval.calibration import read_temperature
from medvl.eval.chexpert import CheXpertLabeler
from medvl.eval.findings import structured_findings
from medvl.models.base import GenerationSettings
from medvl.models.cache import local_model
from medvl.models.registry import build_recipe
from medvl.models.scored_generation import decoding
from medvl.serve.requests import Query, RequestError
from medvl.spec import JobSpec

ATTENTION_DECIMALS = 5
PROBE_QUESTION = "is there an abnormality?"
logger = logging.getLogger("ray.serve")
_base_loads_in_process = 0  # see ModelRunner.stats


class ModelDead(RuntimeError):
    """The model failed a generation from a known-good input: the replica should be replaced."""


def serving_generation(spec: JobSpec) -> GenerationSettings:
    """``serve.num_beams`` / ``serve.max_new_tokens``, each falling back to eval's when 0."""
    return GenerationSettings(spec.serve.num_beams or spec.eval.num_beams,
                              spec.serve.max_new_tokens or spec.eval.max_new_tokens)


def serving_spec(spec: JobSpec) -> JobSpec:
    """The spec a replica loads its model with: ``serve.dtype``, when set, in place of ``model.dtype``."""
    if not spec.serve.dtype:
        return spec
    return dataclasses.replace(spec, model=dataclasses.replace(spec.model, dtype=spec.serve.dtype))


def _row(per_row: list, row: int) -> list:
    return per_row[row] if row < len(per_row) else []


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
    """One loaded model and the recipe that preprocesses, generates and (where it can) draws attention for it.

    With ``adapters`` (records of :mod:`medvl.serve.adapters`) the model is their base, loaded once with the first
    adapter (which stays: it came with the base), and the others are loaded into the same peft model by name
    (:meth:`load_adapter`), dropped again (:meth:`unload_adapter`, Serve's LRU decides when) and switched per
    group of queries: a batch is answered one adapter at a time.
    """

    def __init__(self, spec: JobSpec, checkpoint: str, adapters: list[dict] | None = None):
        spec = serving_spec(spec)
        self.adapters = {a["name"]: a for a in adapters or []}
        if self.adapters:
            checkpoint = next(iter(self.adapters.values()))["folder"]
        self.spec, self.checkpoint = spec, checkpoint
        # A checkpoint on object storage is fetched once into this node's cache (replicas after the first reuse it).
        self.local_checkpoint = local_model(checkpoint, spec.data.endpoint_url)
        self.recipe = build_recipe(spec)
        self.generation = serving_generation(spec)
        self.loaded = self._load_base(self.local_checkpoint)
        self.adapter_loads = self.adapter_unloads = 0  # adapters loaded into the base after it / dropped again
        # adapter name → peft's adapter name; the first came in with the base as peft's "default"
        self.resident = {next(iter(self.adapters)): "default"} if self.adapters else {}
        # each model's (adapter's) calibration temperature, saved beside it by eval (1.0: none saved); it scales
        # the confidences reported, never what is generated
        self.temperature = read_temperature(self.local_checkpoint) or 1.0
        self.temperatures = {name: self.temperature for name in self.resident}
        self._model_lock = threading.RLock()  # one adapter switch + generation at a time
        # chest X-ray report / caption models answer with structured findings (medvl.eval.findings)
        self.labeler = CheXpertLabeler() if spec.eval.clinical and self.recipe.task != "vqa" else None
        self.device = torch.device("cuda" if spec.serve.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        if not spec.model.quantisation:  # bitsandbytes places 8- and 4-bit weights itself
            self.loaded.to(self.device)
        self.preprocess = self.recipe.preprocessor(self.local_checkpoint)
        self.suspect = False  # a query failed alone since the last probe
        self.dead_reason = ""  # set once a probe failed: the replica stays unhealthy
        self._probe_lock = threading.Lock()

    @property
    def takes_question(self) -> bool:
        return self.recipe.task == "vqa"

    def _load_base(self, folder: str):
        global _base_loads_in_process
        _base_loads_in_process += 1
        return self.recipe.load_for_inference(folder)

    def stats(self) -> dict:
        """``base_loads``: base models loaded by this process (a replica: 1); ``adapter_loads`` /
        ``adapter_unloads``: adapters loaded into that base after it (the first adapter comes with the base) and
        dropped again; ``resident``: the adapters loaded now."""
        return {"base_loads": _base_loads_in_process, "adapter_loads": self.adapter_loads,
                "adapter_unloads": self.adapter_unloads, "resident": list(self.resident)}

    def load_adapter(self, name: str) -> None:
        with self._model_lock:
            if name in self.resident:
                return
            peft_name = f"adapter_{len(self.resident)}_{abs(hash(name)) % 10**8}"
            folder = local_model(self.adapters[name]["folder"], self.spec.data.endpoint_url)  # s3:// → local cache
            self.loaded.module.load_adapter(folder, adapter_name=peft_name)
            self.temperatures[name] = read_temperature(folder) or 1.0
            self.loaded.module.to(self.device)
            self.resident[name] = peft_name
            self.adapter_loads += 1
            logger.info("medvl: adapter %s loaded (%d resident)", name, len(self.resident))

    def unload_adapter(self, name: str) -> None:
        with self._model_lock:
            peft_name = self.resident.get(name)
            if peft_name is None or peft_name == "default":  # the base's own adapter stays with it
                return
            self.loaded.module.delete_adapter(peft_name)
            del self.resident[name]
            self.adapter_unloads += 1
            logger.info("medvl: adapter %s unloaded (%d resident)", name, len(self.resident))

    def answer_with(self, name: str, queries: list[Query]) -> list[dict | RequestError]:
        """:meth:`answer` with adapter ``name`` active (loaded here first if it is not)."""
        with self._model_lock:
            self._activate(name)
            return self.answer(queries)

    def stream(self, name: str, query: Query, on_piece: Callable[[str], None],
               max_tokens: int | None = None) -> dict | RequestError:
        """One query's answer (adapter ``name``, "" = the model alone), its settled text handed to ``on_piece``
        while it is generated (at most ``max_tokens`` tokens' text; under beam search nothing is handed out). The
        pieces join to a prefix of the answer's text: the caller sends the rest. Returns what :meth:`answer`
        returns for it."""
        with self._model_lock:
            if name:
                self._activate(name)
            return self.answer([query], on_piece, max_tokens)[0]

    def _activate(self, name: str) -> None:
        self.load_adapter(name)
        self.loaded.module.set_adapter(self.resident[name])
        self.temperature = self.temperatures[name]

    def answer(self, queries: list[Query], on_piece: Callable[[str], None] | None = None,
               max_tokens: int | None = None) -> list[dict | RequestError]:
        """Per query, its answer or the RequestError that refuses it; one query's failure is never another's.
        Queries asking for different sampling temperatures are generated in separate groups."""
        temperatures = list(dict.fromkeys(q.temperature for q in queries))
        if len(temperatures) > 1:
            answers: list = [None] * len(queries)
            for temperature in temperatures:
                places = [i for i, q in enumerate(queries) if q.temperature == temperature]
                for i, answer in zip(places, self.answer([queries[i] for i in places])):
                    answers[i] = answer
            return answers
        try:
            return self.run_batch(queries, on_piece, max_tokens)
        except Exception as error:
            if len(queries) > 1:
                logger.warning("medvl: a batch of %d failed (%s: %s); answering its queries one by one",
                               len(queries), type(error).__name__, error)
                return [self.answer([query])[0] for query in queries]
            logger.exception("medvl: a query failed on its own")
            self.suspect = True
            return [RequestError(500, "generation_failed", f"the model failed on this request "
                                 f"({type(error).__name__}); see the replica's log")]

    def check_health(self) -> None:
        """Raise :class:`ModelDead` when the model no longer generates (probed only after a failed query)."""
        with self._probe_lock:  # Serve's periodic check and /healthz may ask at once: one probe
            if self.dead_reason:
                raise ModelDead(self.dead_reason)
            if not self.suspect:
                return
            try:
                with self._model_lock:
                    (result,) = self.run_batch([self.probe_query()])
                if isinstance(result, RequestError):
                    raise RuntimeError(f"the probe image was refused: {result.message}")
            except Exception as error:
                self.dead_reason = (f"the model failed a generation from a blank image "
                                    f"({type(error).__name__}: {error})")
                logger.error("medvl: %s; this replica reports itself unhealthy", self.dead_reason)
                raise ModelDead(self.dead_reason) from error
            self.suspect = False  # the failed query was the query's fault

    def probe_query(self) -> Query:
        from PIL import Image

        size = self.spec.data.image_size
        question = PROBE_QUESTION if self.takes_question else ""
        return Query(encode_png(Image.new("RGB", (size, size), (128, 128, 128))), question)

    def run_batch(self, queries: list[Query], on_piece: Callable[[str], None] | None = None,
                  max_tokens: int | None = None) -> list[dict | RequestError]:
        """Per query, its answer or the RequestError that refuses it (a bad image fails alone); raises if the
        batch fails as a whole (see :meth:`answer`). The queries share one sampling temperature; ``on_piece``
        (a batch of one): see :meth:`stream`."""
        with self._model_lock, torch.inference_mode():
            batch = self.preprocess(shard_rows(queries))
            kept = [int(i) for i in batch["id"]]  # the preprocessor drops rows whose image does not decode
            results: list[dict | RequestError] = [
                RequestError(400, "not_an_image", "the image could not be decoded (corrupt or truncated file)",
                             field="image")
            ] * len(queries)
            if not kept:
                return results
            tensors = {name: torch.as_tensor(batch[name]).to(self.device) for name in self.recipe.tensor_columns}
            generation = dataclasses.replace(self.generation, confidence_temperature=self.temperature)
            seeds = [queries[i].seed for i in kept]  # one per generated row (see the module docstring)
            seeded = seeds if any(seed is not None for seed in seeds) else ()
            with decoding(queries[0].temperature, on_piece, max_tokens, seeded):
                generated = self.recipe.generate_scored(self.loaded, tensors, generation)
            maps = self.attention([queries[i].attention for i in kept], tensors, generated.texts)
            for row, i in enumerate(kept):
                results[i] = {"text": generated.texts[row], "mean_token_prob": generated.mean_token_probs[row],
                              "batch_size": len(queries)}
                results[i]["token_ends"] = _row(generated.token_ends, row)  # the OpenAI route streams by token
                if self.labeler is not None:
                    results[i].update(structured_findings(
                        self.labeler, generated.texts[row], _row(generated.token_probs, row),
                        _row(generated.token_ends, row)))
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
