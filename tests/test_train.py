"""Ray Train on CPU: two workers lower the loss; the exported checkpoint reloads to the same eval loss;
``medvl eval`` on the trained model writes every file a reviewer reads."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medvl.spec import parse_spec

pytestmark = pytest.mark.slow


def tiny_job(tmp_path: Path, **train) -> dict:
    return {
        "name": "tiny",
        "output_dir": str(tmp_path / "run"),
        "stages": ["prepare", "train"],
        "data": {"format": "synthetic", "synthetic_images": 240, "synthetic_image_size": 64, "image_size": 64,
                 "max_text_length": 40, "records_per_shard": 64, "shuffle_buffer": 0},
        "model": {"recipe": "blip_caption", "preset": "tiny"},
        "train": {"epochs": 2, "batch_size": 16, "lr": 2e-3, "workers": 2, "cpus_per_worker": 0.5,
                  "early_stopping_patience": 0, **train},
        "eval": {"num_beams": 1, "max_new_tokens": 8},
    }


def val_loss_in_process(spec, model_dir: str) -> float:
    """The validation loss of a saved model computed without Ray, over every validation row."""
    import pyarrow.parquet as pq

    from medvl.data.shards import read_manifest, shard_paths
    from medvl.models.registry import build_recipe

    recipe = build_recipe(spec)
    model = recipe.load_for_inference(model_dir).module
    preprocess = recipe.preprocessor(model_dir)
    manifest = read_manifest(spec.shards_location)
    total, count = 0.0, 0
    for path in shard_paths(manifest, spec.shards_location, "val"):
        rows = pq.read_table(path).to_pydict()
        batch = preprocess({k: __import__("numpy").asarray(v, dtype=object) for k, v in rows.items()})
        with torch.no_grad():
            loss, _ = recipe.loss(model, {k: torch.as_tensor(batch[k]) for k in recipe.tensor_columns})
        total, count = total + loss.item() * len(rows["id"]), count + len(rows["id"])
    return total / count


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_local) -> tuple[dict, Path]:
    """One tiny prepare + train run on two workers, shared by the tests below: (job dict, folder)."""
    from medvl.stages import run_stages

    folder = tmp_path_factory.mktemp("train")
    raw = tiny_job(folder)
    run_stages(parse_spec(raw))
    return raw, folder


def test_two_workers_lower_the_loss_and_the_checkpoint_reloads(trained):
    spec = parse_spec(trained[0])
    summary = json.loads((Path(spec.output_dir) / "train" / "train_summary.json").read_text())
    manifest = json.loads((Path(spec.output_dir) / "shards" / "manifest.json").read_text())
    # An even validation split: Ray's equal split over 2 workers then drops no row, so the losses compare exactly.
    assert manifest["counts"]["val"] % 2 == 0

    untrained = val_loss_in_process(spec, summary["model_source"])
    trained = val_loss_in_process(spec, summary["model_dir"])
    assert trained < 0.8 * untrained, (untrained, trained)
    assert summary["history"][-1]["val_loss"] < summary["history"][0]["val_loss"]
    assert trained == pytest.approx(summary["best_val_loss"], rel=1e-4)
    assert (Path(summary["model_dir"]) / "model.safetensors").exists()
    assert not (Path(summary["model_dir"]) / "training_state.pt").exists()
    # Each epoch trained every row once (Ray's equal split over 2 workers drops an odd row out).
    trained_rows = manifest["counts"]["train"] - manifest["counts"]["train"] % 2
    assert summary["epochs"] == [{"epoch": e, "samples": trained_rows, "distinct_samples": trained_rows}
                                 for e in range(2)]
    assert summary["steps"] == summary["planned_steps"] and summary["resumed_at_steps"] == []
    assert summary["trainable_params"] == summary["total_params"] > 0  # full fine-tuning: the report says so
    assert summary["trainable_percent"] == 100.0


def test_medvl_eval_writes_metrics_predictions_report_and_attention_overlays(trained):
    import yaml

    from medvl.cli import main
    from medvl.eval.attention_overlays import overlay_filename

    raw, folder = trained
    spec_path = folder / "job.yaml"
    spec_path.write_text(yaml.safe_dump(raw | {"stages": ["prepare", "train", "eval"]}))
    assert main(["eval", str(spec_path), "--set", "eval.max_samples=12", "--set", "eval.semantic=false",
                 "--set", "eval.attention_maps=2", "--set", "eval.worst_examples=3"]) == 0

    out = Path(raw["output_dir"]) / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("bleu_1", "bleu_4", "meteor", "rouge_l", "cider", "ce_micro_f1_14", "ce_micro_f1_5",
                "laterality_error_rate", "hallucination_rate", "mean_token_prob", "ce_finding_ece"):
        assert isinstance(metrics[key], float), key
    assert metrics["n"] == 12 and 0.0 < metrics["mean_token_prob"] < 1.0
    # eval.calibrate (on by default): the temperature beside the model scored the confidences below
    assert metrics["temperature"] == json.loads((Path(raw["output_dir"]) / "train" / "model" /
                                                 "calibration.json").read_text())["temperature"]
    assert {"token_ece_before", "token_ece_after", "token_nll_before", "token_nll_after"} <= set(metrics)
    if metrics["temperature"] != 1.0:  # the finding ECE of the confidences before the temperature, beside it
        assert isinstance(metrics["ce_finding_ece_before"], float)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(0.0 < row["mean_token_prob"] < 1.0 for row in rows)
    assert metrics["mean_token_prob"] == pytest.approx(sum(r["mean_token_prob"] for r in rows) / 12)
    report = (out / "report.md").read_text()
    assert "| cider |" in report and "The 3 worst examples" in report
    overlays = sorted((out / "attention").glob("*.png"))
    assert [p.name for p in overlays] == sorted(overlay_filename(r["id"]) for r in rows[:2])
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in overlays)


def test_temperature_scaling_fitted_on_val_lowers_token_ece_on_the_test_split(trained):
    """The fit and the test split's token scores run in eval's actor pool; the driver adds up their tables."""
    from medvl.eval.calibration import before_after, read_temperature, token_metrics
    from medvl.eval.evaluate import calibration_temperature, pooled_token_stats
    from medvl.models.registry import build_recipe

    raw, _ = trained
    spec = parse_spec(raw | {"eval": {**raw["eval"], "calibration_samples": 64}})
    model_dir = Path(raw["output_dir"]) / "train" / "model"
    (model_dir / "calibration.json").unlink(missing_ok=True)  # fitted here, whichever test ran first
    temperature = calibration_temperature(spec, build_recipe(spec), str(model_dir))
    assert temperature == read_temperature(model_dir) != 1.0  # fitted on val and saved beside it
    scores = token_metrics(pooled_token_stats(spec, str(model_dir), "test", before_after(temperature), 64),
                           temperature)
    print("quickstart-like tiny model, test split:", scores)
    assert scores["calibration_tokens"] > 200
    assert scores["token_nll_after"] < scores["token_nll_before"]
    assert scores["token_ece_after"] < scores["token_ece_before"], scores


def test_the_fit_on_the_actor_pools_tables_equals_the_fit_in_process(trained):
    """Same rows, same model: the temperature (and the NLL curve) the pool's per-batch tables give is the one
    fit_temperature gives on (logits, targets) computed here, batch by batch."""
    import numpy as np
    import pyarrow.parquet as pq

    from medvl.data.shards import read_manifest, shard_paths
    from medvl.eval.calibration import fit_temperature, temperature_grid
    from medvl.eval.evaluate import pooled_token_stats
    from medvl.models.registry import build_recipe

    raw, _ = trained
    spec = parse_spec(raw | {"eval": {**raw["eval"], "batch_size": 16}})
    model_dir = str(Path(raw["output_dir"]) / "train" / "model")
    pooled = pooled_token_stats(spec, model_dir, "val", temperature_grid(), limit=0)

    recipe = build_recipe(spec)
    model, preprocess = recipe.load_for_inference(model_dir).module, recipe.preprocessor(model_dir)

    def batches():
        for path in shard_paths(read_manifest(spec.shards_location), spec.shards_location, "val"):
            rows = pq.read_table(path).to_pydict()
            batch = preprocess({k: np.asarray(v, dtype=object) for k, v in rows.items()})
            with torch.no_grad():
                yield recipe.target_logits(model, {k: torch.as_tensor(batch[k]) for k in recipe.tensor_columns})

    temperature, in_process = fit_temperature(batches())
    assert pooled.tokens == in_process.tokens > 200
    assert pooled.best_temperature() == pytest.approx(temperature, abs=1e-6)
    np.testing.assert_allclose(pooled.table[:, 0], in_process.table[:, 0], rtol=1e-6)  # NLL at every grid T
    assert pooled.ece(1.0) == pytest.approx(in_process.ece(1.0), abs=1e-6)


def test_startup_clock_names_each_span_by_the_stamp_that_ends_it(monkeypatch):
    from medvl.train import reporting

    now = iter([13.0, 20.0, 20.5])
    monkeypatch.setattr(reporting.time, "time", lambda: next(now))
    clock = reporting.StartupClock({"stage": 10.0, "driver": 11.0})
    assert clock.mark("worker_group") and clock.mark("data") and not clock.mark("data")  # once only
    assert clock.mark("first_step")
    assert clock.durations() == {"driver": 1.0, "worker_group": 2.0, "data": 7.0, "first_step": 0.5, "total": 10.5}
    assert reporting.StartupClock().durations() == {}
