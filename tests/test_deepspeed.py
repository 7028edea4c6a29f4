"""DeepSpeed ZeRO on Ray Train (CPU accelerator over gloo): the config follows the spec, ZeRO-2 and ZeRO-3
train the tiny BLIP-2, and a ZeRO-3 checkpoint consolidates to a folder that reloads to the same loss."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from medvl.spec import SpecError, parse_spec
from medvl.validation import validate
from medvl.train.deepspeed_config import deepspeed_config


def job(tmp_path: Path, stage: int = 2, **train) -> dict:
    return {
        "name": "zero",
        "output_dir": str(tmp_path / "run"),
        "stages": ["prepare", "train"],
        "data": {"format": "synthetic", "synthetic_images": 160, "synthetic_image_size": 48, "image_size": 48,
                 "max_text_length": 40, "records_per_shard": 80, "shuffle_buffer": 0},
        "model": {"recipe": "blip2_lora", "preset": "tiny"},
        "train": {"strategy": "deepspeed", "deepspeed": {"stage": stage}, "finetune": "lora", "epochs": 3,
                  "batch_size": 8, "lr": 1e-2, "workers": 2, "cpus_per_worker": 0.5, "precision": "fp32",
                  "early_stopping_patience": 0, "val_batch_size": 1, **train},
    }


def mean_row_loss(recipe, spec, model_dir: str) -> float:
    """The mean over validation rows of each row's loss (what validation with val_batch_size 1 reports), no Ray."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from medvl.data.shards import read_manifest, shard_paths

    model, preprocess = recipe.load_for_inference(model_dir).module, recipe.preprocessor(model_dir)
    model.eval()
    losses = []
    for path in shard_paths(read_manifest(spec.shards_location), spec.shards_location, "val"):
        rows = pq.read_table(path).to_pylist()
        for row in rows:
            batch = preprocess({key: np.asarray([value], dtype=object) for key, value in row.items()})
            with torch.no_grad():
                loss, _ = recipe.loss(model, {k: torch.as_tensor(batch[k]) for k in recipe.tensor_columns})
            losses.append(loss.item())
    return sum(losses) / len(losses)


def test_config_is_derived_from_the_spec(tmp_path: Path):
    spec = parse_spec(job(tmp_path, stage=3, grad_accum=4, max_grad_norm=0.5, precision="bf16",
                          deepspeed={"stage": 3, "offload_optimizer": True, "offload_params": True}))
    config = deepspeed_config(spec, world_size=2)
    assert config["train_micro_batch_size_per_gpu"] == 8 and config["gradient_accumulation_steps"] == 4
    assert config["train_batch_size"] == 8 * 4 * 2 and config["gradient_clipping"] == 0.5
    assert config["bf16"] == {"enabled": True} and "fp16" not in config
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert "optimizer" not in config and "scheduler" not in config  # the loop passes torch AdamW and its schedule


def test_fp16_gets_dynamic_loss_scaling_and_fp32_neither(tmp_path: Path):
    fp16 = deepspeed_config(parse_spec(job(tmp_path, precision="fp16")), world_size=1)
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0
    fp32 = deepspeed_config(parse_spec(job(tmp_path)), world_size=1)
    assert "fp16" not in fp32 and "bf16" not in fp32


def test_an_expert_json_is_merged_over_the_derived_config(tmp_path: Path):
    expert = tmp_path / "ds.json"
    expert.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "steps_per_print": 5}))
    config = deepspeed_config(parse_spec(job(tmp_path, deepspeed={"stage": 2, "config_file": str(expert)})), 1)
    assert config["zero_optimization"]["reduce_bucket_size"] == 1000 and config["zero_optimization"]["stage"] == 2
    assert config["steps_per_print"] == 5


@pytest.mark.parametrize("contents, named", [
    ({"train_batch_size": 64}, "train_batch_size (set train.batch_size × train.grad_accum × workers)"),
    ({"gradient_accumulation_steps": 4, "train_micro_batch_size_per_gpu": 2},
     "train_micro_batch_size_per_gpu (set train.batch_size); gradient_accumulation_steps (set train.grad_accum)"),
    ({"bf16": {"enabled": True}}, "bf16 (set train.precision)"),
    ({"zero_optimization": {"stage": 3, "reduce_bucket_size": 10}}, "zero_optimization.stage (set train.deepspeed.stage)"),
    ({"optimizer": {"type": "Adam"}}, "optimizer (set train.lr and train.weight_decay"),
])
def test_a_config_file_cannot_override_what_the_spec_derives(tmp_path: Path, contents: dict, named: str):
    expert = tmp_path / "ds.json"
    expert.write_text(json.dumps(contents))
    with pytest.raises(SpecError) as info:
        validate(parse_spec(job(tmp_path, deepspeed={"stage": 2, "config_file": str(expert)})))
    message = str(info.value)
    assert message.startswith("train.deepspeed.config_file: expected only settings medvl does not derive"), message
    assert named in message


def test_workers_take_the_config_file_contents_the_driver_read(tmp_path: Path):
    expert = tmp_path / "ds.json"
    expert.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}}))
    spec = parse_spec(job(tmp_path, deepspeed={"stage": 2, "config_file": str(expert)}))
    from medvl.train.deepspeed_file import read_config_file

    shipped = read_config_file(spec.train.deepspeed.config_file)  # what the trainer puts in train_loop_config
    expert.unlink()  # a worker's node may not have the file at all
    config = deepspeed_config(spec, world_size=2, file_settings=shipped)
    assert config["zero_optimization"]["reduce_bucket_size"] == 1000 and config["train_batch_size"] == 16


@pytest.mark.parametrize("bad, message", [
    ({"deepspeed": {"stage": 1}}, "train.deepspeed.stage: expected one of 2, 3, got 1"),
    ({"deepspeed": {"stage": 2, "offload_params": True}}, "train.deepspeed.offload_params: expected false"),
    ({"deepspeed": {"config_file": "/nope.json"}}, "train.deepspeed.config_file: expected a DeepSpeed JSON file"),
    ({"strategy": "fsdp"}, "train.strategy: expected one of 'ddp', 'deepspeed'"),
])
def test_bad_deepspeed_settings_name_the_field(tmp_path: Path, bad: dict, message: str):
    raw = job(tmp_path)
    raw["train"].update(bad)
    with pytest.raises(SpecError) as info:
        validate(parse_spec(raw))
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_trains_the_tiny_blip2_and_exports_a_consolidated_adapter(tmp_path: Path, ray_local, stage: int,
                                                                       monkeypatch):
    from peft import PeftModel

    from medvl.models.blip2_lora import Blip2LoraRecipe
    from medvl.stages import run_stages

    # An expert file by a path relative to the driver's folder, which the Train workers do not share: they get
    # its contents with the job.
    monkeypatch.chdir(tmp_path)
    Path("ds.json").write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 50_000_000}}))
    spec = parse_spec(job(tmp_path, stage=stage, deepspeed={"stage": stage, "config_file": "ds.json"}))
    run_stages(spec)
    summary = json.loads((Path(spec.output_dir) / "train" / "train_summary.json").read_text())
    history = summary["history"]
    print(stage, history)
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 0.5
    assert summary["steps"] == summary["planned_steps"]
    # The export is a plain peft adapter folder, consolidated from the ZeRO shards of the best checkpoint...
    model_dir = Path(summary["model_dir"])
    assert (model_dir / "adapter_model.safetensors").is_file() and not list(model_dir.rglob("*optim_states*"))
    recipe = Blip2LoraRecipe(spec)
    assert isinstance(recipe.load_for_inference(str(model_dir)).module, PeftModel)
    # ...whose reloaded model gives the validation loss the live (partitioned) model reported.
    manifest = json.loads((Path(spec.output_dir) / "shards" / "manifest.json").read_text())
    assert manifest["counts"]["val"] % 2 == 0  # the equal split over 2 workers drops no validation row
    assert mean_row_loss(recipe, spec, str(model_dir)) == pytest.approx(summary["best_val_loss"], rel=1e-4)


@pytest.mark.slow
def test_a_zero2_search_exports_the_best_trials_consolidated_adapter(tmp_path: Path, ray_local):
    """Tune over DeepSpeed: the best trial's checkpoint holds ZeRO shards, and the search exports them
    consolidated (the export needs the recipe) as an adapter folder peft loads on the shared base."""
    import torch
    import yaml
    from peft import PeftModel
    from transformers import Blip2ForConditionalGeneration

    from medvl.stages import run_stages
    from medvl.train.engines import DEEPSPEED_MARKER

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"train.lr": {"grid": [1e-2, 1e-4]}}))
    raw = job(tmp_path, stage=2, workers=1, epochs=1, max_val_batches=1, val_batch_size=8)
    raw["stages"] = ["prepare", "tune"]
    raw["tune"] = {"space": str(space), "scheduler": "none", "max_steps": 3}
    spec = parse_spec(raw)
    run_stages(spec)

    tune_dir = Path(spec.output_dir) / "tune"
    summary = json.loads((tune_dir / "train_summary.json").read_text())
    trials = [line.split(",") for line in (tune_dir / "trials.csv").read_text().splitlines()[1:]]
    assert len(trials) == 2 and all(row[1] == "TERMINATED" for row in trials)
    best_checkpoints = list((tune_dir / "trials" / summary["best_trial"]).rglob(DEEPSPEED_MARKER))
    assert best_checkpoints  # what was exported was ZeRO shards, not a plain folder
    model_dir = Path(summary["model_dir"])
    assert model_dir == tune_dir / "best" / "model"
    assert (model_dir / "adapter_model.safetensors").is_file() and not list(model_dir.rglob("*optim_states*"))
    assert not (model_dir / DEEPSPEED_MARKER).exists()
    base = Blip2ForConditionalGeneration.from_pretrained(summary["model_source"])
    model = PeftModel.from_pretrained(base, str(model_dir))
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0
    with torch.no_grad():
        assert model.generate(pixel_values=torch.zeros(1, 3, 48, 48), max_new_tokens=4).shape[0] == 1
