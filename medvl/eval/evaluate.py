"""The eval stage: generate on a split of the shards, score, and write what a reviewer reads.

Writes to the stage's folder (paths: :class:`medvl.runs.RunLayout`): the metrics (flat keys), the predictions
(id, reference, prediction, answer type, mean token probability), a report (headline metrics and the worst
examples), attention overlays for the first ``eval.attention_maps`` samples and, when ``eval.baselines`` asks
for them, a comparison of the trained model with the untrained one, with the untrained one prompted
(``zero_shot``: it generates after ``eval.prompt``, as a pretrained model is used without fine-tuning) and with
images shuffled across references (a model that ignores the image scores the same either way).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medvl.data.pipeline import preprocessed, read_split
from medvl.models.base import GenerationSettings, LoadedModel, Recipe
from medvl.models.registry import build_recipe
from medvl.runs import RunLayout
from medvl.spec import JobSpec, StageSpec


@dataclass
class Predictions:
    ids: list[str]
    references: list[str]
    predictions: list[str]
    answer_types: list[str]
    confidences: list[float] = field(default_factory=list)  # mean token probability of each prediction
    extra_metrics: dict[str, float] = field(default_factory=dict)  # recipe-specific (see Recipe.extra_eval_metrics)
    attention: list[Grounding] = field(default_factory=list)  # the first eval.attention_maps samples


@dataclass
class Grounding:
    """One sample's model input image and where the decoder looked while reading its prediction."""

    id: str
    pixel_values: np.ndarray  # (3, H, W), as the model saw it
    attention: np.ndarray  # (rows, cols), sums to 1
    prediction: str


def generate_predictions(spec: JobSpec, recipe: Recipe, model_dir: str, attention_maps: int = 0,
                         prompt: str = "") -> Predictions:
    """Stream the eval split through Ray Data and generate on the driver (after ``prompt``, when given); attention
    maps of the first ``attention_maps`` samples."""
    settings = spec.eval
    generation = dataclasses.replace(GenerationSettings.from_eval(settings), prompt=prompt)
    loaded = recipe.load_for_inference(model_dir)
    factory = functools.partial(recipe.preprocessor, model_dir)
    dataset = read_split(spec.shards_location, settings.split, spec.data.endpoint_url)
    if settings.max_samples:
        dataset = dataset.limit(settings.max_samples)
    dataset = preprocessed(dataset, factory, num_cpus=spec.data.preprocess_cpus)
    out = Predictions([], [], [], [])
    extras: dict[str, list[float]] = {}
    for batch in dataset.iter_batches(batch_size=settings.batch_size, batch_format="numpy"):
        tensors = {name: torch.as_tensor(batch[name]) for name in recipe.tensor_columns}
        with torch.inference_mode():
            generated = recipe.generate_scored(loaded, tensors, generation)
            for key, value in recipe.extra_eval_metrics(loaded.module, tensors).items():
                extras.setdefault(key, []).append(value)
        wanted = attention_maps - len(out.attention)
        if wanted > 0:
            out.attention += ground(recipe, loaded, tensors, batch["id"][:wanted], generated.texts[:wanted])
        out.predictions += generated.texts
        out.confidences += generated.mean_token_probs
        out.ids += [str(i) for i in batch["id"]]
        out.references += [recipe.target_text({k: batch[k][i] for k in ("text", "answer")}) for i in range(len(batch["id"]))]
        out.answer_types += [str(t) for t in batch["answer_type"]]
        print(f"[medvl eval] {len(out.predictions)} generated", flush=True)
    out.extra_metrics = {key: sum(values) / len(values) for key, values in extras.items()}
    return out


def ground(recipe: Recipe, loaded: LoadedModel, tensors: dict[str, torch.Tensor], ids: np.ndarray,
           texts: list[str]) -> list[Grounding]:
    """Attention maps of the first ``len(texts)`` samples of a batch; none (with a note) if the recipe has none."""
    first = {name: value[: len(texts)] for name, value in tensors.items()}
    with torch.inference_mode():
        maps = recipe.attention_maps(loaded, first, texts)
    if maps is None:
        print(f"[medvl eval] eval.attention_maps: {recipe.spec.model.recipe} has no decoder cross-attention to "
              "draw; no overlays written", flush=True)
        return []
    return [Grounding(str(i), first["pixel_values"][k].numpy(), maps[k], text)
            for k, (i, text) in enumerate(zip(ids, texts))]


def score(spec: JobSpec, recipe: Recipe, preds: Predictions) -> dict:
    """Every metric that applies to the recipe's task, as one flat dict."""
    refs, hyps = preds.references, preds.predictions
    if recipe.task == "vqa":
        from medvl.eval.calibration import vqa_calibration
        from medvl.eval.vqa_metrics import normalize_answer, vqa_scores

        correct = [normalize_answer(r) == normalize_answer(h) for r, h in zip(refs, hyps)]
        return vqa_scores(refs, hyps, preds.answer_types) | vqa_calibration(correct, preds.confidences)
    from medvl.eval.caption_metrics import caption_scores

    metrics = dict(caption_scores(refs, hyps))
    if spec.eval.clinical:
        metrics.update(clinical_scores(refs, hyps, preds.confidences))
    if spec.eval.semantic:
        from medvl.eval.embedding_metrics import bertscore, embedding_cosine

        model = spec.eval.embedding_model or None
        metrics.update(bertscore(refs, hyps, model_path=model))
        metrics.update(embedding_cosine(refs, hyps, model_path=model))
    return metrics


def clinical_scores(references: list[str], predictions: list[str], confidences: list[float]) -> dict:
    from medvl.eval.calibration import finding_calibration
    from medvl.eval.chexpert import CheXpertLabeler
    from medvl.eval.clinical_metrics import clinical_efficacy, hallucination_rate, laterality_error_rate

    labeler = CheXpertLabeler()
    ref_labels, gen_labels = labeler.label_many(references), labeler.label_many(predictions)
    return (clinical_efficacy(ref_labels, gen_labels) | hallucination_rate(ref_labels, gen_labels)
            | laterality_error_rate(references, predictions) | finding_calibration(ref_labels, gen_labels, confidences))


def shuffled_references(preds: Predictions, seed: int = 0) -> Predictions:
    """Pair each prediction with another sample's reference (the images-shuffled control)."""
    order = list(range(len(preds.references)))
    random.Random(seed).shuffle(order)
    return Predictions(preds.ids, [preds.references[i] for i in order], preds.predictions,
                       [preds.answer_types[i] for i in order], preds.confidences)


def run_eval_stage(spec: JobSpec, stage: StageSpec, model_dir: str, untrained_dir: str | None = None) -> dict:
    recipe = build_recipe(spec)
    layout = RunLayout.of(spec.output_dir)
    layout.stage(stage.name).mkdir(parents=True, exist_ok=True)
    preds = generate_predictions(spec, recipe, model_dir, spec.eval.attention_maps)
    metrics = score(spec, recipe, preds) | preds.extra_metrics
    metrics["mean_token_prob"] = float(np.mean(preds.confidences)) if preds.confidences else 0.0
    metrics["n"] = len(preds.predictions)
    write_outputs(layout, stage.name, metrics, preds)
    write_attention_overlays(layout.attention(stage.name), preds.attention)
    write_report(layout.report(stage.name), spec, recipe, metrics, preds)
    print(f"[medvl eval] {stage.name}: {_headline(metrics)}", flush=True)

    comparison = {"trained": metrics}
    if "untrained" in spec.eval.baselines and untrained_dir:
        comparison["untrained"] = score(spec, recipe, generate_predictions(spec, recipe, untrained_dir))
    if "zero_shot" in spec.eval.baselines and untrained_dir:
        zero_shot = generate_predictions(spec, recipe, untrained_dir, prompt=spec.eval.prompt)
        comparison["zero_shot"] = score(spec, recipe, zero_shot)
    if "shuffled_images" in spec.eval.baselines:
        comparison["shuffled_images"] = score(spec, recipe, shuffled_references(preds, spec.data.seed))
    if len(comparison) > 1:
        layout.comparison(spec.name).write_text(json.dumps(comparison, indent=2))
        for name, values in comparison.items():
            print(f"[medvl eval] {name:>16}: {_headline(values)}", flush=True)
    return metrics


def write_outputs(layout: RunLayout, stage: str, metrics: dict, preds: Predictions) -> None:
    layout.metrics(stage).write_text(json.dumps(metrics, indent=2))
    keys = ("id", "reference", "prediction", "answer_type", "mean_token_prob")
    with open(layout.predictions(stage), "w") as handle:
        for row in zip(preds.ids, preds.references, preds.predictions, preds.answer_types, preds.confidences):
            handle.write(json.dumps(dict(zip(keys, row))) + "\n")


def write_attention_overlays(folder: Path, grounding: list[Grounding]) -> None:
    from medvl.eval.attention_overlays import overlay_filename, save_overlay

    for sample in grounding:
        save_overlay(folder / overlay_filename(sample.id), sample.pixel_values, sample.attention,
                     f"{sample.id}: {sample.prediction}")


def write_report(path: Path, spec: JobSpec, recipe: Recipe, metrics: dict, preds: Predictions) -> None:
    """A page a reviewer reads: the headline metrics, then the worst examples next to their references."""
    lines = [f"# {spec.name}: evaluation on the {spec.eval.split} split ({len(preds.predictions)} samples)", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    worst = worst_examples(recipe, preds, spec.eval.worst_examples)
    if worst:
        lines += ["", f"## The {len(worst)} worst examples", "",
                  "| id | score | reference | prediction |", "|---|---|---|---|"]
        lines += [f"| {preds.ids[i]} | {s:.3f} | {_cell(preds.references[i])} | {_cell(preds.predictions[i])} |"
                  for i, s in worst]
    path.write_text("\n".join(lines) + "\n")


def worst_examples(recipe: Recipe, preds: Predictions, count: int) -> list[tuple[int, float]]:
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

        scores = per_sample_cider(preds.references, preds.predictions)
    return sorted(enumerate(scores), key=lambda pair: pair[1])[:count]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _headline(metrics: dict) -> str:
    keys = [k for k in ("bleu_4", "meteor", "rouge_l", "cider", "bertscore_f1", "ce_micro_f1_14", "mean_token_prob",
                        "laterality_correct_rate", "vqa_acc",
                        "vqa_acc_closed", "vqa_acc_open") if k in metrics]
    return "  ".join(f"{k} {metrics[k]:.3f}" for k in keys if isinstance(metrics[k], (int, float, np.floating)))
