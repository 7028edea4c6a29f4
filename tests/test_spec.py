"""Every shipped job spec validates; malformed specs fail with the field path named, before Ray starts."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from medvl.spec import SpecError, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
JOB_SPECS = sorted((ROOT / "jobs").glob("*.yaml"))


def test_there_are_job_specs():
    assert any(p.name == "quickstart.yaml" for p in JOB_SPECS)


@pytest.mark.parametrize("path", JOB_SPECS, ids=lambda p: p.name)
def test_every_job_spec_validates(path: Path):
    spec = load_spec(path)
    assert spec.stages and spec.output_dir


def minimal(**sections) -> dict:
    return {"name": "t", "output_dir": "out", "stages": ["prepare", "train"], **sections}


@pytest.mark.parametrize(
    "raw, message",
    [
        (minimal(train={"lr": "fast"}), 'train.lr: expected a positive number, got "fast"'),
        (minimal(train={"lr": -1.0}), "train.lr: expected a positive number, got -1.0"),
        (minimal(train={"lr": float("inf")}), "train.lr: expected a finite number, got inf"),
        (minimal(train={"lr": "1e999"}), "train.lr: expected a finite number, got inf"),
        (minimal(train={"warmup_ratio": float("nan")}), "train.warmup_ratio: expected a finite number, got nan"),
        (minimal(data={"split_fractions": [float("nan"), 0.5, 0.5]}),
         "data.split_fractions[0]: expected a finite number, got nan"),
        (minimal(train={"epochs": 2.5}), "train.epochs: expected a positive number, got 2.5"),
        (minimal(train={"lrr": 1}), "train.lrr: unknown field"),
        (minimal(data={"format": "dicomdir"}), "data.format: expected one of"),
        (minimal(data={"format": "roco"}), "data.source: expected the dataset folder"),
        (minimal(data={"split_fractions": [0.5, 0.5, 0.5]}), "data.split_fractions: expected three numbers"),
        (minimal(model={"lora_dropout": 1.5}), "model.lora_dropout: expected a number between 0 and 1, got 1.5"),
        (minimal(train={"use_gpu": "yes"}), 'train.use_gpu: expected true or false, got "yes"'),
        (minimal(eval={"baselines": ["nope"]}), "eval.baselines[0]: expected one of"),
        ({"name": "t", "stages": ["train"]}, "output_dir: required field is missing"),
        (minimal(output_dir=""), "output_dir: expected a folder or a URL such as s3://bucket/runs/job"),
        (minimal(eval={"workers": 0}), "eval.workers: expected a positive number, got 0"),
        (minimal(eval={"num_gpus": -1}), "eval.num_gpus: expected a number ≥ 0, got -1"),
        (minimal(eval={"require_java": "yes"}), 'eval.require_java: expected true or false, got "yes"'),
        (minimal(ray={"resource_wait_s": -5}), "ray.resource_wait_s: expected a number ≥ 0, got -5"),
        (minimal(eval={"attention_maps": -1}), "eval.attention_maps: expected a number ≥ 0, got -1"),
        (minimal(stages=[]), "stages: expected a non-empty list"),
        (minimal(stages=["prepare", "bake"]), "stages[1].kind: expected one of"),
        (minimal(stages=[{"kind": "train", "start_from": "dapt"}]), "stages[0].start_from: expected the name of an earlier train stage"),
        (minimal(stages=[{"kind": "train", "set": {"train.lr": "x"}}]), "stages[0].set: train.lr: expected a positive number"),
        (minimal(serve={"port": 70000}), "serve.port: expected a port number (1–65535), got 70000"),
        (minimal(serve={"max_batch_size": 0}), "serve.max_batch_size: expected a positive number, got 0"),
        (minimal(serve={"api_key_env": "MY-KEY"}), 'serve.api_key_env: expected the name of an environment variable'),
        (minimal(serve={"autoscaling_min_replicas": 3, "autoscaling_max_replicas": 2}),
         "serve.autoscaling_min_replicas: expected at most serve.autoscaling_max_replicas (2), got 3"),
        (minimal(serve={"max_batch_size": 8, "max_ongoing_requests": 4}), "serve.max_ongoing_requests: expected 0 or at least"),
        (minimal(train={"lr": 1e-4, "warmup_start_lr": 1e-3}), "train.warmup_start_lr: expected at most train.lr (0.0001), got 0.001"),
        (minimal(train={"lr": 1e-4, "min_lr": 2e-4}), "train.min_lr: expected at most train.lr (0.0001), got 0.0002"),
        (minimal(train={"min_lr": -1e-9}), "train.min_lr: expected a number ≥ 0, got -1e-09"),
        (minimal(model={"itc_queue_size": -256}), "model.itc_queue_size: expected a number ≥ 0, got -256"),
        (minimal(model={"itc_queue_size": "big"}), 'model.itc_queue_size: expected a number ≥ 0, got "big"'),
        (minimal(tune={"eval_every_steps": 2.5}), "tune.eval_every_steps: expected a number ≥ 0, got 2.5"),
        (minimal(eval={"prompt": 3}), "eval.prompt: expected a string, got 3"),
    ],
)
def test_malformed_spec_names_the_field(raw: dict, message: str):
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    assert str(info.value).startswith(message), str(info.value)


def test_overrides_are_typed_and_applied(tmp_path: Path):
    path = tmp_path / "job.yaml"
    path.write_text("name: t\noutput_dir: out\nstages: [train]\ntrain: {lr: 1.0e-3}\n")
    spec = load_spec(path, ["train.lr=1e-4", "train.workers=2", "model.preset=tiny", "eval.baselines=[untrained]"])
    assert spec.train.lr == pytest.approx(1e-4)
    assert spec.train.workers == 2 and spec.model.preset == "tiny" and spec.eval.baselines == ["untrained"]


def test_stage_overrides_apply_to_that_stage_only():
    spec = parse_spec(minimal(stages=["prepare", {"kind": "train", "name": "warm", "set": {"train.lr": 0.5}},
                                      {"kind": "train", "name": "main", "start_from": "warm"}]))
    warm, main = spec.stages[1], spec.stages[2]
    assert spec.for_stage(warm).train.lr == 0.5
    assert spec.for_stage(main).train.lr == spec.train.lr != 0.5
    assert main.start_from == "warm"


def test_command_line_set_wins_over_a_stage_set(tmp_path: Path):
    path = tmp_path / "job.yaml"
    path.write_text("name: t\noutput_dir: out\ntrain: {lr: 1.0e-3}\n"
                    "stages: [{kind: train, name: warm, set: {train.lr: 0.5, train.epochs: 4}}]\n")
    spec = load_spec(path, ["train.lr=2e-3"])
    warm = spec.for_stage(spec.stages[0])
    assert warm.train.lr == pytest.approx(2e-3) and warm.train.epochs == 4


def test_cli_validate_fails_with_one_line_and_no_ray(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: t\noutput_dir: out\nstages: [train]\ntrain: {lr: fast}\n")
    done = subprocess.run([sys.executable, "-m", "medvl.cli", "run", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == 'error: train.lr: expected a positive number, got "fast"'
    assert "ray" not in done.stdout.lower()


def test_yaml_nan_and_infinity_are_refused_with_the_field_named(tmp_path: Path):
    path = tmp_path / "job.yaml"
    path.write_text("name: t\noutput_dir: out\nstages: [prepare]\ndata:\n  split_fractions: [.nan, .5, .5]\n")
    with pytest.raises(SpecError, match=r"^data\.split_fractions\[0\]: expected a finite number, got nan"):
        load_spec(path)
    with pytest.raises(SpecError, match=r"^serve\.batch_wait_timeout_s: expected a finite number, got inf"):
        load_spec(path, ["data.split_fractions=[0.8, 0.1, 0.1]", "serve.batch_wait_timeout_s=.inf"])


def test_output_dir_in_a_string_value_is_the_specs_output_dir(tmp_path: Path):
    path = tmp_path / "job.yaml"
    path.write_text("name: t\noutput_dir: out\ndata:\n  shards: ${output_dir}/a\n"  # inside {…}, quote it
                    "stages: [{kind: prepare, name: other, set: {data.shards: '${output_dir}/b'}}, prepare]\n")
    spec = load_spec(path)
    assert spec.shards_location == "out/a" and spec.for_stage(spec.stages[0]).shards_location == "out/b"
    moved = load_spec(path, ["output_dir=/tmp/elsewhere"])
    assert moved.for_stage(moved.stages[0]).shards_location == "/tmp/elsewhere/b"


@pytest.mark.parametrize("model, message", [
    ({"recipe": "blip_caption", "itc_queue_size": 256},
     "model.itc_queue_size: recipe blip_caption does not read it (it is for blip_dapt); leave it unset, got 256"),
    ({"recipe": "softprompt_llm", "load_in_4bit": True},
     "model.load_in_4bit: recipe softprompt_llm does not read it (it is for blip2)"),
])
def test_validate_refuses_a_new_model_option_on_a_recipe_that_does_not_read_it(model, message):
    from medvl.validation import validate

    raw = minimal(model=model, train={"use_gpu": True})
    with pytest.raises(SpecError) as info:
        validate(parse_spec(raw))
    assert str(info.value).startswith(message), str(info.value)
