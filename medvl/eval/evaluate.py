"""The eval stage: generate on a split of the shards, score, and write what a reviewer reads.

Generation runs where the cluster's accelerators are: a Ray Data pool of ``eval.workers`` actors
(:class:`Generator`), each holding the model in ``model.dtype`` on ``eval.num_gpus`` / ``eval.num_cpus``,
streams the split through ``map_batches`` (decode, tokenise, generate, draw attention). The driver only gathers
the predictions and scores them (the metrics need the whole set, and METEOR's JVM). The untrained and zero-shot baselines
ride along in the same pass: each actor holds every model (one copy of each folder) and generates with each on
every batch, so the data is read and decoded once and no second pool starts. The shuffled-images baseline needs no generation at all.

Calibration (``eval.calibrate``) uses the same resources: unless the model has a temperature saved beside it, a
pool of :class:`TokenScorer` actors first streams ``eval.calibration_samples`` validation rows through the
model under teacher forcing and sends back one small :class:`~medvl.eval.calibration.TokenStats` table per batch;
the driver adds them up and picks T. The eval split's token-level ECE before and after T rides along in the
generation pass (the trained model's teacher-forced logits of each batch), so calibrating costs one extra pool
over at most ``eval.calibration_samples`` rows and no model ever loads on the driver.

Writes to the stage's folder (paths: :class:`medvl.runs.RunLayout`, local or on object storage): the metrics
(flat keys), the predictions (id, reference, prediction, answer type, mean token probability), a report
(headline metrics and the worst examples), attention overlays for the first ``eval.attention_maps`` samples of
the split, what the evaluation cost (wall time, samples generated per second, which model)
and, when ``eval.baselines`` asks for them, a comparison of the trained model with the untrained one, with the
untrained one prompted (``zero_shot``: it generates after ``eval.prompt``, as a pretrained model is used without
fine-tuning) and with images shuffled across references (a model that ignores the image scores the same either
way).
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
import torch

from medvl import storage
from medvl.data.pipeline import read_split
from medvl.data.shards import read_manifest, shard_paths
from medvl.eval.calibration import TokenStats, before_after, token_metrics
from medvl.models.base import GenerationSettings, Recipe
from medvl.models.cache import local_model, model_filesystem
from medvl.models.registry import build_recipe
from medvl.runs import RunLayout
from medvl.spec import JobSpec, SpecError, StageSpec
from medvl.storage import Location
from medvl.tracking.progress import Progress, stage_label

TRAINED, UNTRAINED, ZERO_SHOT = "trained", "untrained", "zero_shot"


@dataclass
class Predictions:
    ids: list[str]
    references: list[str]
    predictions: list[str]
    answer_types: list[str]
    confidences: list[float] = field(default_factory=list)  # mean token probability of each prediction
    extra_metrics: dict[str, float] = field(default_factory=dict)  # recipe-specific (see Recipe.extra_eval_metrics)
    overlays: dict[str, bytes] = field(default_factory=dict)  # id → attention overlay PNG (first eval.attention_maps)
    uncalibrated_confidences: list[float] = field(default_factory=list)  # at temperature 1 (eval.calibrate)
    temperature: float | None = None  # the calibration temperature the confidences were scored at (None: none)
    token_stats: TokenStats | None = None  # teacher-forced reference tokens at T = 1 and at ``temperature``


# --------------------------------------------------------------------------------------------- generation


def generate_predictions(spec: JobSpec, models: dict[str, str], label: str = "eval",
                         prompts: dict[str, str] | None = None,
                         temperatures: dict[str, float] | None = None) -> dict[str, Predictions]:
    """Every model of ``models`` (name → folder, URL or hub id) generating on the eval split in one pass of the
    actor pool, after its prompt in ``prompts`` where it has one, its confidences scored at its calibration
    temperature in ``temperatures`` (1.0 when absent); the first model's predictions also carry the attention
    overlays. ``label`` names the progress line."""
    settings = spec.eval
    dataset = read_split(spec.shards_location, settings.split, spec.data.endpoint_url)
    # Blocks in shard order (the actors still work in parallel): eval.max_samples takes the split's first rows.
    dataset.context.execution_options.preserve_order = True
    if settings.max_samples:
        dataset = dataset.limit(settings.max_samples)
    order = split_ids(spec, settings.max_samples)  # the split's ids in shard order
    generated = dataset.map_batches(
        Generator,
        fn_constructor_args=(spec, models, frozenset(order[: settings.attention_maps]), _filesystems(spec, models),
                             prompts or {}, temperatures or {}),
        batch_size=settings.batch_size,
        batch_format="numpy",
        compute=_actor_pool(settings.workers),
        num_cpus=settings.num_cpus,
        num_gpus=settings.num_gpus,
    )
    columns: dict[str, list] = {}
    progress = Progress(label, total=len(order), unit="generated", every_s=spec.tracking.progress_every_s)
    for batch in generated.iter_batches(batch_size=None, batch_format="numpy"):
        for name, values in batch.items():
            columns.setdefault(name, []).extend(values.tolist())
        progress.update(len(columns.get("id", [])))
    progress.close()
    rank = {sample_id: i for i, sample_id in enumerate(order)}
    return {name: _gathered(columns, name, rank, first=i == 0, temperature=(temperatures or {}).get(name))
            for i, name in enumerate(models)}


def _filesystems(spec: JobSpec, models: dict[str, str]) -> dict[str, object]:
    """Each remote model's filesystem, built here: it carries the driver's S3 endpoint and keys to the actors."""
    return {name: model_filesystem(location, spec.data.endpoint_url) for name, location in models.items()}


def _actor_pool(workers: int):
    import ray.data

    return ray.data.ActorPoolStrategy(size=workers)


def split_ids(spec: JobSpec, limit: int = 0) -> list[str]:
    """The ids of the eval split in shard order (the first ``limit`` when given): read from the id column only.
    The first ``eval.attention_maps`` get overlays, and predictions are written in this order."""
    location, endpoint = spec.shards_location, spec.data.endpoint_url
    fs, _ = storage.filesystem_for(location, endpoint)
    ids: list[str] = []
    for path in shard_paths(read_manifest(location, endpoint), location, spec.eval.split, endpoint):
        ids += pq.read_table(path, filesystem=fs, columns=["id"]).column("id").to_pylist()
        if limit and len(ids) >= limit:
            return ids[:limit]
    return ids


def _gathered(columns: dict[str, list], model: str, rank: dict[str, int], first: bool,
              temperature: float | None = None) -> Predictions:
    """One model's predictions out of the pool's columns, in the split's order (rows arrive in whatever order
    the actors finish; sorting makes the files and the shuffled baseline reproducible)."""
    ids_seen = columns.get("id", [])
    order = sorted(range(len(ids_seen)), key=lambda i: (rank.get(ids_seen[i], len(rank)), ids_seen[i]))

    def column(name: str) -> list:
        return [columns[name][i] for i in order]

    prefix = f"{model}."
    extras = {name[len(prefix) + len("extra."):]: float(np.mean(values)) for name, values in columns.items()
              if name.startswith(prefix + "extra.") and values}
    ids = column("id")
    overlays = {i: png for i, png in zip(ids, column("overlay_png")) if png} if first else {}
    stats = None
    if temperature is not None and columns.get(prefix + "token_stats"):  # per-batch tables, summed here
        stats = TokenStats.from_flat(before_after(temperature), np.sum(columns[prefix + "token_stats"], axis=0))
    return Predictions(ids, column("reference"), column(prefix + "prediction"), column("answer_type"),
                       [float(p) for p in column(prefix + "mean_token_prob")], extras, overlays,
                       [float(p) for p in column(prefix + "uncalibrated_mean_token_prob")], temperature, stats)


class Generator:
    """A Ray Data actor: the models of one eval pass, loaded once, generating for every batch of shard rows.

    A model on object storage is fetched to this node's cache first. Output columns per row: ``id``,
    ``reference``, ``answer_type``, ``overlay_png`` (the first model's attention overlay for the rows in
    ``attention_ids``, else empty) and, per model name, ``<name>.prediction``, ``<name>.mean_token_prob`` and
    ``<name>.extra.<key>`` (the recipe's extra metric of the row's batch); for a model given a calibration
    temperature also ``<name>.token_stats``: the batch's teacher-forced :class:`TokenStats` at T = 1 and at its
    temperature on the batch's first row, zeros on the others (the column sums to the split's), so the token-level
    ECE before and after rides along with generation instead of costing another pass of the model.
    """

    def __init__(self, spec: JobSpec, models: dict[str, str], attention_ids: frozenset[str],
                 filesystems: dict[str, object] | None = None, prompts: dict[str, str] | None = None,
                 temperatures: dict[str, float] | None = None):
        torch.set_num_threads(max(1, math.ceil(spec.eval.num_cpus)))
        self.recipe = build_recipe(spec)
        settings = GenerationSettings.from_eval(spec.eval)
        self.device = eval_device(spec)
        self.attention_ids = attention_ids
        self.temperatures = temperatures or {}
        self.models = {}
        loaded_by_location: dict[str, tuple] = {}  # the untrained and zero-shot baselines share one copy
        for name, location in models.items():
            if location not in loaded_by_location:
                loaded_by_location[location] = load_on(self.recipe, spec, location, (filesystems or {}).get(name),
                                                       self.device)
            prompt = (prompts or {}).get(name, "")
            self.models[name] = (*loaded_by_location[location], dataclasses.replace(
                settings, prompt=prompt, confidence_temperature=self.temperatures.get(name, 1.0)))

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {}
        for name, (loaded, preprocess, settings) in self.models.items():
            batch = preprocess(rows)  # drops rows whose image does not decode (the same rows for every model)
            ids = [str(i) for i in batch["id"]]
            tensors = {k: torch.as_tensor(batch[k]).to(self.device) for k in self.recipe.tensor_columns}
            with torch.inference_mode():
                generated = self.recipe.generate_scored(loaded, tensors, settings) if ids else None
                extras = self.recipe.extra_eval_metrics(loaded.module, tensors) if ids else {}
            if not out:
                out["id"] = ids
                out["reference"] = [self.recipe.target_text({k: batch[k][i] for k in ("text", "answer")})
                                    for i in range(len(ids))]
                out["answer_type"] = [str(t) for t in batch["answer_type"]]
                out["overlay_png"] = self._overlays(loaded, tensors, ids, generated.texts if ids else [])
            elif ids != out["id"]:
                raise RuntimeError(f"eval models kept different rows of a batch ({name}): {ids} vs {out['id']}")
            out[f"{name}.prediction"] = generated.texts if ids else []
            out[f"{name}.mean_token_prob"] = generated.mean_token_probs if ids else []
            out[f"{name}.uncalibrated_mean_token_prob"] = (generated.uncalibrated_mean_token_probs
                                                           or generated.mean_token_probs) if ids else []
            for key, value in extras.items():
                out[f"{name}.extra.{key}"] = [float(value)] * len(ids)
            if name in self.temperatures:
                out[f"{name}.token_stats"] = self._token_stats(loaded, tensors, self.temperatures[name], len(ids))
        return {name: _column(values) for name, values in out.items()}

    def _token_stats(self, loaded, tensors: dict[str, torch.Tensor], temperature: float, rows: int) -> list:
        temperatures = before_after(temperature)
        if not rows:
            return []
        with torch.inference_mode():
            stats = TokenStats.of(*self.recipe.target_logits(loaded.module, tensors), temperatures)
        return [stats.flat] + [np.zeros_like(stats.flat)] * (rows - 1)

    def _overlays(self, loaded, tensors: dict[str, torch.Tensor], ids: list[str], texts: list[str]) -> list[bytes]:
        from medvl.eval.attention_overlays import overlay_png

        wanted = [k for k, i in enumerate(ids) if i in self.attention_ids]
        pngs = [b""] * len(ids)
        if not wanted:
            return pngs
        index = torch.as_tensor(wanted)
        chosen = {name: value[index] for name, value in tensors.items()}
        with torch.inference_mode():
            maps = self.recipe.attention_maps(loaded, chosen, [texts[k] for k in wanted])
        if maps is None:
            return pngs
        pixels = chosen["pixel_values"].float().cpu().numpy()
        for position, k in enumerate(wanted):
            pngs[k] = overlay_png(pixels[position], maps[position], f"{ids[k]}: {texts[k]}")
        return pngs


def load_on(recipe: Recipe, spec: JobSpec, location: str, filesystem, device: torch.device) -> tuple:
    """(LoadedModel in model.dtype on ``device``, its preprocessor) of a model folder, URL or hub id, fetched to
    this node's cache first when it is on object storage."""
    local = local_model(location, spec.data.endpoint_url, filesystem)
    loaded = recipe.load_for_inference(local)
    if not spec.model.quantisation:  # bitsandbytes places 8- and 4-bit weights itself
        loaded.to(device)
    return loaded, recipe.preprocessor(local)


def eval_device(spec: JobSpec) -> torch.device:
    return torch.device("cuda" if spec.eval.num_gpus > 0 and torch.cuda.is_available() else "cpu")


def _column(values: list) -> np.ndarray:
    if values and isinstance(values[0], (str, bytes)):
        column = np.empty(len(values), dtype=object)  # strings and bytes of unequal length stay objects
        column[:] = values
        return column
    return np.asarray(values, dtype=np.float64) if values else np.empty(0, dtype=object)


# --------------------------------------------------------------------------------------------- scoring


def java_reason(spec: JobSpec, recipe: Recipe) -> str | None:
    """Why METEOR cannot run (None: it can, or the task does not need it). With ``eval.require_java`` a missing
    Java fails here, before anything is generated, naming the fix."""
    if recipe.task == "vqa":
        return None
    from medvl.eval.caption_metrics import java_unavailable_reason

    reason = java_unavailable_reason()
    if reason and spec.eval.require_java:
        raise SpecError(f"eval.require_java: {reason}; cluster/Dockerfile and cluster/aws-gpu.yaml install one. "
                        "Or set eval.require_java: false to score every other metric without METEOR")
    return reason


def score(spec: JobSpec, recipe: Recipe, preds: Predictions, java: bool = True) -> dict:
    """Every metric that applies to the recipe's task, as one flat dict (``java=False``: no METEOR, see
    :func:`medvl.eval.caption_metrics.caption_scores`)."""
    refs, hyps = preds.references, preds.predictions
    if recipe.task == "vqa":
        from medvl.eval.calibration import vqa_calibration
        from medvl.eval.vqa_metrics import normalize_answer, vqa_scores

        correct = [normalize_answer(r) == normalize_answer(h) for r, h in zip(refs, hyps)]
        metrics = vqa_scores(refs, hyps, preds.answer_types) | vqa_calibration(correct, preds.confidences)
        if _calibrated(preds):
            metrics["vqa_ece_before"] = vqa_calibration(correct, preds.uncalibrated_confidences)["vqa_ece"]
        return metrics
    from medvl.eval.caption_metrics import caption_scores

    metrics = dict(caption_scores(refs, hyps, java=java))
    if spec.eval.clinical:
        metrics.update(clinical_scores(refs, hyps, preds.confidences,
                                       preds.uncalibrated_confidences if _calibrated(preds) else None))
    if spec.eval.semantic:
        from medvl.eval.embedding_metrics import bertscore, embedding_cosine

        model = spec.eval.embedding_model or None
        metrics.update(bertscore(refs, hyps, model_path=model))
        metrics.update(embedding_cosine(refs, hyps, model_path=model))
    return metrics


def _calibrated(preds: Predictions) -> bool:
    """Scored at a fitted temperature: the ECE at T = 1 goes beside the calibrated one (even when T is 1)."""
    return preds.temperature is not None and len(preds.uncalibrated_confidences) == len(preds.confidences)


def clinical_scores(references: list[str], predictions: list[str], confidences: list[float],
                    uncalibrated: list[float] | None = None) -> dict:
    """CheXpert clinical efficacy, hallucination, laterality and finding calibration (``ce_finding_ece_before``
    from the ``uncalibrated`` confidences too, when given)."""
    from medvl.eval.calibration import finding_calibration
    from medvl.eval.chexpert import CheXpertLabeler
    from medvl.eval.clinical_metrics import clinical_efficacy, hallucination_rate, laterality_error_rate

    labeler = CheXpertLabeler()
    ref_labels, gen_labels = labeler.label_many(references), labeler.label_many(predictions)
    metrics = (clinical_efficacy(ref_labels, gen_labels) | hallucination_rate(ref_labels, gen_labels)
               | laterality_error_rate(references, predictions)
               | finding_calibration(ref_labels, gen_labels, confidences))
    if uncalibrated is not None:
        metrics["ce_finding_ece_before"] = finding_calibration(ref_labels, gen_labels, uncalibrated)["ce_finding_ece"]
    return metrics


def shuffled_references(preds: Predictions, seed: int = 0) -> Predictions:
    """Pair each prediction with another sample's reference (the images-shuffled control)."""
    order = list(range(len(preds.references)))
    random.Random(seed).shuffle(order)
    return Predictions(preds.ids, [preds.references[i] for i in order], preds.predictions,
                       [preds.answer_types[i] for i in order], preds.confidences)


def run_eval_stage(spec: JobSpec, stage: StageSpec, model_dir: str, untrained_dir: str | None = None) -> dict:
    recipe = build_recipe(spec)
    missing_java = java_reason(spec, recipe)  # fails here when Java is required and missing
    if missing_java:
        print(f"[medvl eval] scoring without METEOR (eval.require_java is false): {missing_java}", flush=True)
    java = missing_java is None
    layout = RunLayout.for_spec(spec)
    layout.stage(stage.name).mkdir()
    started = time.perf_counter()
    models = {TRAINED: model_dir}
    for baseline in (UNTRAINED, ZERO_SHOT):
        if baseline in spec.eval.baselines and untrained_dir:
            models[baseline] = untrained_dir
    temperature = calibration_temperature(spec, recipe, model_dir, stage.name) if spec.eval.calibrate else None
    temperatures = {TRAINED: temperature} if temperature is not None else {}
    generated = generate_predictions(spec, models, label=stage_label("eval", stage.name),
                                     prompts={ZERO_SHOT: spec.eval.prompt}, temperatures=temperatures)
    generating_s = time.perf_counter() - started
    preds = generated[TRAINED]
    calibration = token_metrics(preds.token_stats, temperature) if preds.token_stats is not None else {}
    metrics = score(spec, recipe, preds, java) | preds.extra_metrics | calibration
    metrics["mean_token_prob"] = float(np.mean(preds.confidences)) if preds.confidences else 0.0
    metrics["n"] = len(preds.predictions)
    write_outputs(layout, stage.name, metrics, preds)
    write_attention_overlays(layout.attention(stage.name), preds, spec)
    write_report(layout.report(stage.name), spec, recipe, metrics, preds, java)
    print(f"[medvl eval] {stage.name}: {_headline(metrics)}", flush=True)

    comparison = {"trained": metrics}
    if UNTRAINED in generated:
        comparison["untrained"] = score(spec, recipe, generated[UNTRAINED], java)
    if ZERO_SHOT in generated:
        comparison["zero_shot"] = score(spec, recipe, generated[ZERO_SHOT], java)
    if "shuffled_images" in spec.eval.baselines:
        comparison["shuffled_images"] = score(spec, recipe, shuffled_references(preds, spec.data.seed), java)
    if len(comparison) > 1:
        layout.comparison(spec.name).write_text(json.dumps(comparison, indent=2))
        for name, values in comparison.items():
            print(f"[medvl eval] {name:>16}: {_headline(values)}", flush=True)
    cost = {"stage": stage.name, "model_dir": model_dir, "recipe": spec.model.recipe, "split": spec.eval.split,
            "samples": len(preds.predictions), "wall_time_s": time.perf_counter() - started,
            "generate_time_s": generating_s, "samples_per_s": len(preds.predictions) / max(generating_s, 1e-9)}
    layout.eval_summary(stage.name).write_text(json.dumps(cost, indent=2))
    return metrics


# --------------------------------------------------------------------------------------------- calibration


def calibration_temperature(spec: JobSpec, recipe: Recipe, model_dir: str, stage: str = "eval") -> float | None:
    """The model's confidence temperature: the one saved beside it, else fitted now on the first
    ``eval.calibration_samples`` validation rows (in the eval actor pool, see :func:`pooled_token_stats`) and
    saved beside it. None when the recipe has no teacher-forced view. The driver reads and fits tables only."""
    from medvl.eval.calibration import calibration_record, temperature_grid, temperature_of

    if type(recipe).target_logits is Recipe.target_logits:
        print(f"[medvl eval] eval.calibrate: the {spec.model.recipe} recipe has no teacher-forced view; "
              "confidences stay uncalibrated", flush=True)
        return None
    saved = _calibration_location(spec, model_dir)
    if saved is not None and saved.is_file():
        return temperature_of(saved.read_text())
    fitted = pooled_token_stats(spec, model_dir, "val", temperature_grid(), spec.eval.calibration_samples,
                                label=stage_label("calibrate", stage))
    temperature = fitted.best_temperature()
    if saved is not None:
        saved.write_text(calibration_record(temperature, fitted, "val"))
    print(f"[medvl eval] calibration: temperature {temperature:.3f} fitted on {fitted.tokens} validation "
          f"tokens (NLL {fitted.mean_nll(1.0):.4f} → {fitted.mean_nll(temperature):.4f})", flush=True)
    return temperature


def pooled_token_stats(spec: JobSpec, model_dir: str, split: str, temperatures: tuple[float, ...], limit: int,
                       label: str = "calibrate") -> TokenStats:
    """The teacher-forced :class:`TokenStats` of the first ``limit`` rows of ``split`` at ``temperatures``,
    computed by a Ray Data pool of ``eval.workers`` :class:`TokenScorer` actors on the eval resources (the model
    may not fit on the driver); each batch comes back as one table, and the driver adds them up."""
    dataset = read_split(spec.shards_location, split, spec.data.endpoint_url)
    if limit:
        dataset = dataset.limit(limit)
    scored = dataset.map_batches(
        TokenScorer,
        fn_constructor_args=(spec, model_dir, temperatures, _filesystems(spec, {TRAINED: model_dir})[TRAINED]),
        batch_size=spec.eval.batch_size,
        batch_format="numpy",
        compute=_actor_pool(spec.eval.workers),
        num_cpus=spec.eval.num_cpus,
        num_gpus=spec.eval.num_gpus,
    )
    total = TokenStats.empty(temperatures)
    progress = Progress(label, unit="rows scored", every_s=spec.tracking.progress_every_s)
    done = 0
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        for rows, flat in zip(batch["rows"], batch["token_stats"]):
            total += TokenStats.from_flat(temperatures, flat)
            done += int(rows)
        progress.update(done)
    progress.close()
    return total


class TokenScorer:
    """A Ray Data actor: one model on the eval resources, reducing each batch of shard rows to one row
    (``rows``: how many it scored, ``token_stats``: the flat :class:`TokenStats` table of its reference tokens)."""

    def __init__(self, spec: JobSpec, model_dir: str, temperatures: tuple[float, ...], filesystem=None):
        torch.set_num_threads(max(1, math.ceil(spec.eval.num_cpus)))
        self.recipe = build_recipe(spec)
        self.device = eval_device(spec)
        self.loaded, self.preprocess = load_on(self.recipe, spec, model_dir, filesystem, self.device)
        self.temperatures = temperatures

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = self.preprocess(rows)
        stats = TokenStats.empty(self.temperatures)
        if len(batch["id"]):
            tensors = {k: torch.as_tensor(batch[k]).to(self.device) for k in self.recipe.tensor_columns}
            with torch.inference_mode():
                stats = TokenStats.of(*self.recipe.target_logits(self.loaded.module, tensors), self.temperatures)
        return {"rows": np.asarray([len(batch["id"])]), "token_stats": stats.flat[None, :]}


def _calibration_location(spec: JobSpec, model_dir: str) -> Location | None:
    """Where the temperature is saved: beside the weights of a model folder (local or on object storage); None
    for a hub id (nothing of ours to write into)."""
    from medvl.runs import CALIBRATION_FILE

    if not storage.is_remote(model_dir) and not Location.of(model_dir).is_dir():
        return None
    return Location.of(model_dir, spec.data.endpoint_url) / CALIBRATION_FILE


def write_outputs(layout: RunLayout, stage: str, metrics: dict, preds: Predictions) -> None:
    layout.metrics(stage).write_text(json.dumps(metrics, indent=2))
    keys = ("id", "reference", "prediction", "answer_type", "mean_token_prob")
    rows = zip(preds.ids, preds.references, preds.predictions, preds.answer_types, preds.confidences)
    layout.predictions(stage).write_text("".join(json.dumps(dict(zip(keys, row))) + "\n" for row in rows))


def write_attention_overlays(folder: Location, preds: Predictions, spec: JobSpec) -> None:
    from medvl.eval.attention_overlays import overlay_filename

    if spec.eval.attention_maps and not preds.overlays:
        print(f"[medvl eval] eval.attention_maps: {spec.model.recipe} has no decoder cross-attention to draw; "
              "no overlays written", flush=True)
    for sample_id, png in preds.overlays.items():
        (folder / overlay_filename(sample_id)).write_bytes(png)


def write_report(path: Location, spec: JobSpec, recipe: Recipe, metrics: dict, preds: Predictions,
                 java: bool = True) -> None:
    """A page a reviewer reads: the headline metrics, then the worst examples next to their references."""
    lines = [f"# {spec.name}: evaluation on the {spec.eval.split} split ({len(preds.predictions)} samples)", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    worst = worst_examples(recipe, preds, spec.eval.worst_examples, java)
    if worst:
        lines += ["", f"## The {len(worst)} worst examples", "",
                  "| id | score | reference | prediction |", "|---|---|---|---|"]
        lines += [f"| {preds.ids[i]} | {s:.3f} | {_cell(preds.references[i])} | {_cell(preds.predictions[i])} |"
                  for i, s in worst]
    path.write_text("\n".join(lines) + "\n")


def worst_examples(recipe: Recipe, preds: Predictions, count: int, java: bool = True) -> list[tuple[int, float]]:
    """(index, per-sample score) of the lowest scorers: CIDEr for captions, edit similarity for VQA."""
    if not count or not preds.predictions:
        return []
    if recipe.task == "vqa":
        from rapidfuzz.distance import Levenshtein

        from medvl.eval.vqa_metrics import normalize_answer

        scores = [Levenshtein.normalized_similarity(normalize_answer(r), normalize_answer(p))
                  for r, p in zip(preds.references, preds.predictions)]
    else:
        from medvl.eval.caption_metrics import per_sample_cider

        scores = per_sample_cider(preds.references, preds.predictions, java)
    return sorted(enumerate(scores), key=lambda pair: pair[1])[:count]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _headline(metrics: dict) -> str:
    keys = [k for k in ("bleu_4", "meteor", "rouge_l", "cider", "bertscore_f1", "ce_micro_f1_14", "mean_token_prob",
                        "laterality_correct_rate", "vqa_acc",
                        "vqa_acc_closed", "vqa_acc_open") if k in metrics]
    return "  ".join(f"{k} {metrics[k]:.3f}" for k in keys if isinstance(metrics[k], (int, float, np.floating)))
