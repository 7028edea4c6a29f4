"""Hyperparameter search: the tune section validates; a search with ASHA stops trials early and exports a best
adapter that peft loads and the eval stage scores; an interrupted search resumes without rerunning trials."""
from __future__ import annotations

import csv
import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from medvl.spec import SpecError, load_spec, parse_spec
from medvl.validation import validate
from medvl.tune.results import TrialRow, best_job_spec
from medvl.tune.search import concurrency, trial_cpus
from medvl.tune.space import Dimension
from medvl.tune.stage import base_trial_spec, trial_datasets
from medvl.tune.trial import runs_in_trial, trial_spec

IMAGE_SIZE = 32


def search_job(tmp_path: Path, space: dict, stages: list, **tune) -> dict:
    """Tiny BLIP-2 + LoRA on 160 synthetic images: 128 training rows, 8 optimizer steps per epoch."""
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(space))
    return {
        "name": "search",
        "output_dir": str(tmp_path / "run"),
        "stages": stages,
        "data": {"format": "synthetic", "synthetic_images": 160, "synthetic_image_size": 48, "image_size": IMAGE_SIZE,
                 "max_text_length": 40, "records_per_shard": 80, "shuffle_buffer": 0, "preprocess_cpus": 0.1},
        "model": {"recipe": "blip2_lora", "preset": "tiny", "lora_dropout": 0.0},
        "train": {"finetune": "lora", "epochs": 1, "batch_size": 16, "lr": 1e-2, "cpus_per_worker": 0.25,
                  "eval_every_steps": 2, "max_val_batches": 1, "early_stopping_patience": 0},
        "eval": {"num_beams": 1, "max_new_tokens": 8, "max_samples": 8, "semantic": False, "clinical": False},
        "tune": {"space": str(space_file), **tune},
    }


# ------------------------------------------------------------------------------------------ no Ray


@pytest.mark.parametrize(
    "tune, message",
    [
        ({"space": ""}, 'tune.space: expected a search space file (e.g. tune_spaces/blip2_lora.yaml) for the tune stage'),
        ({"space": "nope.yaml"}, 'tune.space: expected a search space file'),
        ({"space": "softprompt_lora"}, 'tune.search_alg: expected "random" for a space that samples'),
        ({"space": "blip2_lora", "reduction_factor": 1}, "tune.reduction_factor: expected a number > 1, got 1"),
        ({"space": "blip2_lora", "mode": "lowest"}, "tune.mode: expected one of 'min', 'max'"),
        ({"space": "blip2_lora", "max_steps": 100}, "tune.grace_period: expected at most tune.max_steps (100), got 250"),
        ({"space": "blip2_lora", "gpus_per_trial": 0.5}, "tune.gpus_per_trial: expected 0 while train.use_gpu"),
        ({"space": "blip2_lora", "num_samples": 0}, "tune.num_samples: expected a positive number, got 0"),
    ],
)
def test_malformed_tune_section_names_the_field(tune: dict, message: str):
    with pytest.raises(SpecError) as info:
        validate(parse_spec({"name": "t", "output_dir": "out", "stages": ["prepare", "tune"], "tune": tune}))
    assert str(info.value).startswith(message), str(info.value)


def test_a_malformed_space_file_fails_at_spec_validation(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train.lr: {uniform: [0.1, 0.01]}\n")
    with pytest.raises(SpecError, match=r"^tune.space: bad.yaml: train.lr.uniform: expected low < high"):
        validate(parse_spec({"name": "t", "output_dir": "out", "stages": ["tune"], "tune": {"space": str(bad)}}))


def test_trial_spec_applies_the_sampled_values_in_its_own_folder(tmp_path: Path):
    spec = parse_spec(search_job(tmp_path, {"train.lr": {"grid": [1e-3]}}, ["prepare", "tune"],
                                 max_steps=6, grace_period=2, cpus_per_trial=0.5))
    base = base_trial_spec(spec)
    trial = trial_spec(base, {"model.lora_r": 2, "train.lr": 3e-3}, tmp_path / "run" / "tune" / "trials" / "t1")
    assert trial.model.lora_r == 2 and trial.train.lr == pytest.approx(3e-3)
    assert trial.train.max_steps == 6 and trial.train.cpus_per_worker == 0.5
    assert trial.output_dir == str(tmp_path / "run" / "tune" / "trials" / "t1")
    assert trial.shards_location == str(tmp_path / "run" / "shards")  # the search's shards, not the trial's
    assert [s.kind for s in trial.stages] == ["train"]
    assert trial.train.eval_every_steps == 2  # tune.eval_every_steps unset: train's


def test_the_shipped_search_validates_where_asha_judges_without_an_override(tmp_path: Path):
    """jobs/mimic_blip2_lora.yaml's trials validate every 250 steps, ASHA's grace period and first rung."""
    from medvl.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[1] / "jobs" / "mimic_blip2_lora.yaml")
    assert spec.tune.eval_every_steps == 250 == spec.tune.grace_period != spec.train.eval_every_steps
    trial = trial_spec(base_trial_spec(spec), {"train.lr": 1e-4}, tmp_path / "t1")
    assert trial.train.eval_every_steps == 250
    assert spec.tune.max_steps % trial.train.eval_every_steps == 0  # every rung (250, 750, 2250) on a validation


def test_concurrency_fits_the_cluster_or_names_the_field(tmp_path: Path):
    spec = parse_spec(search_job(tmp_path, {"train.lr": {"grid": [1e-3]}}, ["tune"]))
    assert trial_cpus(spec) == pytest.approx(0.25 + 2 * 0.1 + 0.25 + 0.01)
    assert concurrency(spec, {"CPU": 2.0}) == 2
    raw = search_job(tmp_path, {"train.lr": {"grid": [1e-3]}}, ["tune"], max_concurrent_trials=3)
    with pytest.raises(SpecError, match=r"^tune.max_concurrent_trials: expected at most 2 \(each trial holds 0.71 CPUs"):
        concurrency(parse_spec(raw), {"CPU": 2.0})


def test_best_job_spec_replaces_the_tune_stage_with_a_train_stage_and_validates(tmp_path: Path):
    spec = parse_spec(search_job(tmp_path, {"train.lr": {"grid": [1e-3]}}, ["prepare", "tune", "eval"], max_steps=6,
                                 grace_period=2))
    row = TrialRow("t1", "TERMINATED", {"model.lora_r": 2, "train.lr": 3e-3}, 6, 6, 1.0, 1.0, "")
    path = tmp_path / "best.yaml"
    path.write_text(yaml.safe_dump(best_job_spec(spec, spec.stages[1], row)))
    best = load_spec(path)
    assert [s.kind for s in best.stages] == ["prepare", "train", "eval"]
    assert best.model.lora_r == 2 and best.train.lr == pytest.approx(3e-3) and best.train.max_steps == 6


# --------------------------------------------------------------------------------------------- Ray


def read_trials(tune_dir: Path) -> list[dict]:
    with open(tune_dir / "trials.csv") as handle:
        return list(csv.DictReader(handle))


def test_one_worker_cpu_trials_train_in_their_own_process_others_under_a_torch_trainer(tmp_path: Path):
    spec = parse_spec(search_job(tmp_path, {"train.lr": {"grid": [1e-2]}}, ["tune"]))
    assert runs_in_trial(spec, ["train.lr", "model.lora_r"])
    assert not runs_in_trial(spec, ["train.lr", "train.workers"])  # a trial might get two workers
    two = parse_spec(search_job(tmp_path, {"train.lr": {"grid": [1e-2]}}, ["tune"]) | {
        "train": {"finetune": "lora", "workers": 2, "cpus_per_worker": 0.25}})
    assert not runs_in_trial(two, ["train.lr"])


def test_trials_share_preprocessed_data_only_when_no_searched_field_changes_preprocessing(tmp_path: Path):
    spec = parse_spec(search_job(tmp_path, {"train.lr": {"grid": [1e-2]}}, ["tune"]))
    for field in ("data.image_size", "model.num_query_tokens", "model.recipe"):
        # None before anything is preprocessed (no Ray is running here: reaching it would fail)
        assert trial_datasets(spec, [Dimension(field, "grid", (1, 2))], "unused", 128) is None


@pytest.mark.slow
def test_asha_search_stops_trials_early_and_exports_a_best_adapter_peft_loads(tmp_path, ray_local):
    import torch
    from peft import PeftModel
    from ray.util.state import list_actors
    from transformers import Blip2ForConditionalGeneration

    from medvl.stages import run_stages
    from medvl.tune.cleanup import leaked_placement_groups

    # 6 trials; lr 1e-5 barely moves, so ASHA (judging at step 2, keeping the best half) stops such trials.
    space = {"train.lr": {"grid": [1e-2, 1e-5]}, "model.lora_r": {"grid": [2, 4, 8]}}
    raw = search_job(tmp_path, space, ["prepare", "tune", "eval"], grace_period=2, reduction_factor=2, max_steps=4,
                     max_concurrent_trials=2)
    spec = parse_spec(raw)

    def train_actors() -> set[str]:
        """Alive Ray Train actors (ids); ones an earlier test left behind do not count against this search."""
        alive = list_actors(address=ray_local.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")])
        return {a.actor_id for a in alive if "Train" in (a.class_name or "")}

    before = train_actors()
    run_stages(spec)

    tune_dir = Path(spec.output_dir) / "tune"
    rows = read_trials(tune_dir)
    assert len(rows) == 6 and len({r["trial_id"] for r in rows}) == 6
    assert {(r["train.lr"], r["model.lora_r"]) for r in rows} == {(lr, r) for lr in ("0.01", "1e-05") for r in "248"}
    assert all(r["status"] == "TERMINATED" and r["val_loss"] for r in rows)
    stopped = [r for r in rows if r["stopped_early"] == "True"]
    assert stopped and all(r["stopped_by"] == "asha" and int(r["steps"]) == 2 for r in stopped), rows
    assert any(int(r["steps"]) == 4 == int(r["planned_steps"]) for r in rows)
    best = rows[0]  # best first
    assert best["train.lr"] == "0.01" and float(best["val_loss"]) == min(float(r["val_loss"]) for r in rows)
    assert (tune_dir / "trials.md").read_text().count("\n| ") == 7  # header + 6 trials
    assert (tune_dir / "val_loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Every trial reported where its start-up went (benchmarks/tune_asha.py prints it); one-worker trials train in
    # their own process (no Train worker group: medvl.tune.trial).
    startups = [json.loads(f.read_text().splitlines()[0])["startup_s"] for f in (tune_dir / "search").glob("*/result.json")]
    parts = {"stage", "driver", "model", "data", "first_step", "total"}
    assert len(startups) == 6 and all(set(s) == parts and s["total"] > 0 for s in startups), startups
    # Ended trials freed their Train workers and the workers' placement groups (see medvl/tune/cleanup.py).
    deadline = time.monotonic() + 30
    while (train_actors() - before or leaked_placement_groups()) and time.monotonic() < deadline:
        time.sleep(1)
    assert not train_actors() - before and not leaked_placement_groups()

    # The best adapter loads with peft on the shared base and matches the best trial's rank.
    summary = json.loads((tune_dir / "train_summary.json").read_text())
    model_dir = Path(summary["model_dir"])
    assert model_dir == tune_dir / "best" / "model" and summary["best_trial"] == best["trial_id"]
    adapter = json.loads((model_dir / "adapter_config.json").read_text())
    assert adapter["r"] == int(best["model.lora_r"])
    model = PeftModel.from_pretrained(Blip2ForConditionalGeneration.from_pretrained(summary["model_source"]), model_dir)
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0
    with torch.no_grad():
        pixels = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
        assert model.generate(pixel_values=pixels, max_new_tokens=4).shape[0] == 1
    # Every trial's adapter is exported too, best first: what serve.adapters ["top:K"] serves.
    from medvl.serve.adapters import resolve_adapters

    trial_models = json.loads((tune_dir / "trial_models.json").read_text())
    assert [t["trial_id"] for t in trial_models] == [r["trial_id"] for r in rows]
    assert all((Path(t["model_dir"]) / "adapter_config.json").is_file() for t in trial_models)
    top = resolve_adapters(parse_spec({**raw, "serve": {"adapters": ["top:2"]}}))
    assert [a["name"] for a in top] == [r["trial_id"] for r in rows[:2]]
    # The search is tracked: under the tune stage's run, a child run per trial with its whole spec and its
    # validations (a trial ASHA stopped has fewer).
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{Path(spec.output_dir) / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    tracked = mlflow.search_runs(experiment_names=["search"])
    kinds = dict(zip(tracked["run_id"], tracked["tags.medvl.kind"]))
    tune_run = tracked[tracked["tags.medvl.kind"] == "tune"].iloc[0]
    assert kinds[tune_run["tags.mlflow.parentRunId"]] == "job"
    trials = tracked[tracked["tags.medvl.kind"] == "trial"]
    assert len(trials) == 6 and set(trials["tags.mlflow.parentRunId"]) == {tune_run["run_id"]}
    assert sorted(zip(trials["params.train.lr"].astype(float), trials["params.model.lora_r"].astype(int))) == sorted(
        (float(r["train.lr"]), int(r["model.lora_r"])) for r in rows)
    steps_by_lr_rank = {(float(r["train.lr"]), int(r["model.lora_r"])): int(r["steps"]) for r in rows}
    for _, trial in trials.iterrows():
        losses = MlflowClient(uri).get_metric_history(trial["run_id"], "val_loss")
        steps = steps_by_lr_rank[(float(trial["params.train.lr"]), int(trial["params.model.lora_r"]))]
        assert [m.step for m in losses] == list(range(2, steps + 1, 2))
        assert trial["metrics.samples_per_s"] > 0 and trial["metrics.train_loss"] > 0
    assert {"trials.csv", "trials.md", "val_loss_curves.png"} <= {
        a.path for a in MlflowClient(uri).list_artifacts(tune_run["run_id"])}
    # …and the eval stage after the tune stage scored it.
    metrics = json.loads((Path(spec.output_dir) / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 8 and "cider" in metrics
    # The best config is a ready-to-run job spec.
    rerun = load_spec(tune_dir / "best" / "job.yaml")
    assert [s.kind for s in rerun.stages] == ["prepare", "train", "eval"]
    assert rerun.model.lora_r == int(best["model.lora_r"]) and rerun.train.lr == pytest.approx(1e-2)


class InterruptAfter:
    """A Tune callback that presses Ctrl+C once ``count`` trials have completed.

    Tune pickles callbacks with the experiment and a restored search runs with them again: the restored copy
    is disarmed (an interrupt happens once)."""

    def __new__(cls, count: int):
        from ray.tune import Callback

        class _Interrupt(Callback):
            def __init__(self):
                self.completed, self.armed = 0, True

            def __setstate__(self, state):
                self.__dict__.update(state, armed=False)

            def on_trial_complete(self, iteration, trials, trial, **info):
                self.completed += 1
                if self.armed and self.completed == count:
                    os.kill(os.getpid(), signal.SIGINT)

        return _Interrupt()


@pytest.mark.slow
def test_interrupted_search_resumes_without_rerunning_finished_trials(tmp_path, ray_local):
    from medvl.stages import run_stages
    from medvl.tune.stage import run_tune_stage

    space = {"train.lr": {"grid": [1e-2, 1e-3]}}
    spec = parse_spec(search_job(tmp_path, space, ["prepare", "tune"], scheduler="none", max_steps=2,
                                 max_concurrent_trials=1))
    run_stages(spec, ("prepare",))
    stage = spec.stages[1]
    first = run_tune_stage(spec, stage, callbacks=[InterruptAfter(1)])
    assert not first["complete"] and not first["restored"]
    tune_dir = Path(spec.output_dir) / "tune"
    finished = {r["trial_id"] for r in read_trials(tune_dir) if r["status"] == "TERMINATED"}
    assert len(finished) == 1
    summaries = {t: (tune_dir / "trials" / t / "train" / "train_summary.json").stat().st_mtime_ns for t in finished}

    second = run_tune_stage(spec, stage)
    assert second["complete"] and second["restored"]
    rows = read_trials(tune_dir)
    assert len(rows) == 2 and len({r["trial_id"] for r in rows}) == 2 and all(r["status"] == "TERMINATED" for r in rows)
    assert {r["train.lr"] for r in rows} == {"0.01", "0.001"}
    starts = [json.loads(line)["trial_id"] for line in (tune_dir / "trial_starts.jsonl").read_text().splitlines()]
    assert all(starts.count(t) == 1 for t in finished), starts  # the finished trial did not run again
    assert set(starts) == {r["trial_id"] for r in rows}
    assert {t: (tune_dir / "trials" / t / "train" / "train_summary.json").stat().st_mtime_ns for t in finished} == summaries
    assert (tune_dir / "best" / "model" / "adapter_model.safetensors").is_file()
