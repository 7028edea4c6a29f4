"""The eval stage: generate on a split of the shards, score, and write what a reviewer reads.

Writes to ``<output_dir>/<stage name>/``: ``metrics.json`` (flat keys), ``predictions.jsonl`` (id, reference,
prediction) and, when ``eval.baselines`` asks for them, ``<output_dir>/<job name>.json`` comparing the
trained model with the untrained one and with images shuffled across references (a model that ignores the
image scores the same either way).
"""
from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medvl.data.pipeline import preprocessed, read_split
from medvl.models.base import Recipe
from medvl.models.registry import build_recipe
from medvl.spec import JobSpec, StageSpec


@dataclass
class Predictions:
    ids: list[str]
    references: list[str]
    predictions: list[str]
    answer_types: list[str]
    extra_metrics: dict[str, float] = field(default_factory=dict)  # recipe-specific (see Recipe.extra_eval_metrics)


def generate_predictions(spec: JobSpec, recipe: Recipe, model_dir: str) -> Predictions:
    """Stream the eval split through Ray Data and generate on the driver."""
    settings = spec.eval
    model = recipe.load_for_inference(model_dir)
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
            out.predictions += recipe.generate(model, tensors)
            for key, value in recipe.extra_eval_metrics(model, tensors).items():
                extras.setdefault(key, []).append(value)
        out.ids += [str(i) for i in batch["id"]]
        out.references += [recipe.target_text({k: batch[k][i] for k in ("text", "answer")}) for i in range(len(batch["id"]))]
        out.answer_types += [str(t) for t in batch["answer_type"]]
        print(f"[medvl eval] {len(out.predictions)} generated", flush=True)
    out.extra_metrics = {key: sum(values) / len(values) for key, values in extras.items()}
    return out


def score(recipe: Recipe, preds: Predictions) -> dict:
    if recipe.task == "vqa":
        from medvl.eval.vqa_metrics import vqa_scores

        return vqa_scores(preds.references, preds.predictions, preds.answer_types)
    from medvl.eval.caption_metrics import caption_scores

    metrics = dict(caption_scores(preds.references, preds.predictions))
    metrics.update(laterality(preds.references, preds.predictions))
    return metrics


def laterality(references: list[str], predictions: list[str]) -> dict:
    try:
        from medvl.eval.clinical_metrics import laterality_error_rate
    except ImportError:  # the clinical module is optional for caption-only installs
        return {}
    return laterality_error_rate(references, predictions)


def shuffled_references(preds: Predictions, seed: int = 0) -> Predictions:
    """Pair each prediction with another sample's reference (the images-shuffled control)."""
    order = list(range(len(preds.references)))
    random.Random(seed).shuffle(order)
    return Predictions(preds.ids, [preds.references[i] for i in order], preds.predictions,
                       [preds.answer_types[i] for i in order])


def run_eval_stage(spec: JobSpec, stage: StageSpec, model_dir: str, untrained_dir: str | None = None) -> dict:
    recipe = build_recipe(spec)
    out = Path(spec.output_dir).absolute() / stage.name
    out.mkdir(parents=True, exist_ok=True)
    preds = generate_predictions(spec, recipe, model_dir)
    metrics = score(recipe, preds) | preds.extra_metrics
    metrics["n"] = len(preds.predictions)
    write_outputs(out, metrics, preds)
    print(f"[medvl eval] {stage.name}: {_headline(metrics)}", flush=True)

    comparison = {"trained": metrics}
    if "untrained" in spec.eval.baselines and untrained_dir:
        comparison["untrained"] = score(recipe, generate_predictions(spec, recipe, untrained_dir))
    if "shuffled_images" in spec.eval.baselines:
        comparison["shuffled_images"] = score(recipe, shuffled_references(preds, spec.data.seed))
    if len(comparison) > 1:
        path = Path(spec.output_dir).absolute() / f"{spec.name}.json"
        path.write_text(json.dumps(comparison, indent=2))
        for name, values in comparison.items():
            print(f"[medvl eval] {name:>16}: {_headline(values)}", flush=True)
    return metrics


def write_outputs(out: Path, metrics: dict, preds: Predictions) -> None:
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    with open(out / "predictions.jsonl", "w") as handle:
        for row in zip(preds.ids, preds.references, preds.predictions, preds.answer_types):
            handle.write(json.dumps(dict(zip(("id", "reference", "prediction", "answer_type"), row))) + "\n")


def _headline(metrics: dict) -> str:
    keys = [k for k in ("bleu_4", "meteor", "rouge_l", "cider", "laterality_correct_rate", "vqa_acc",
                        "vqa_acc_closed", "vqa_acc_open") if k in metrics]
    return "  ".join(f"{k} {metrics[k]:.3f}" for k in keys if isinstance(metrics[k], (int, float, np.floating)))
