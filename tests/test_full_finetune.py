"""Full fine-tuning of the large-model recipes under ZeRO-3 on 2 CPU workers (the tiny presets): BLIP-2 with every
weight training (and gradient checkpointing on), the soft-prompt recipe with its whole LM training. Validation
loss falls, and the consolidated export reloads with from_pretrained to the validation loss the partitioned
model reported."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medvl.models.registry import build_recipe
from medvl.spec import parse_spec
from test_deepspeed import job, mean_row_loss


def run(raw: dict) -> tuple:
    """Train; check the loss fell (from the untrained start, and over the validations); return what it wrote."""
    from medvl.stages import run_stages

    spec = parse_spec(raw)
    run_stages(spec)
    summary = json.loads((Path(spec.output_dir) / "train" / "train_summary.json").read_text())
    history = [entry["val_loss"] for entry in summary["history"]]
    untrained = mean_row_loss(build_recipe(spec), spec, summary["model_source"])
    print(untrained, history)
    assert summary["steps"] == summary["planned_steps"]
    assert history[-1] < history[0] and summary["best_val_loss"] < untrained - 1.0
    return spec, summary, Path(summary["model_dir"]), Path(summary["model_source"])


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], prefix: str) -> tuple[int, int]:
    """(weights under ``prefix`` that differ, weights under ``prefix``)."""
    keys = [k for k in before if k.startswith(prefix)]
    return sum(not torch.equal(before[k], after[k]) for k in keys), len(keys)


@pytest.mark.slow
def test_blip2_full_under_zero3_trains_every_weight_and_exports_a_plain_folder(tmp_path: Path, ray_local):
    from transformers import Blip2ForConditionalGeneration

    raw = job(tmp_path, stage=3, finetune="full", lr=1e-3, gradient_checkpointing=True)
    raw["model"]["recipe"] = "blip2"
    spec, summary, model_dir, start = run(raw)

    assert not (model_dir / "adapter_config.json").exists() and not list(model_dir.rglob("*optim_states*"))
    Blip2ForConditionalGeneration.from_pretrained(model_dir)  # a plain BLIP-2 folder, no peft, no DeepSpeed
    before, after = load_file(start / "model.safetensors"), load_file(model_dir / "model.safetensors")
    for part in ("vision_model.", "qformer.", "language_projection.", "language_model."):
        moved, total = changed(before, after, part)
        assert moved > 0.9 * total, (part, moved, total)  # the ViT too: train.finetune full
    assert mean_row_loss(build_recipe(spec), spec, str(model_dir)) == pytest.approx(summary["best_val_loss"], rel=1e-4)


@pytest.mark.slow
def test_softprompt_whole_lm_under_zero3_trains_the_lm_not_the_resnet_and_exports_it(tmp_path: Path, ray_local):
    from transformers import AutoModelForCausalLM

    raw = job(tmp_path, stage=3, finetune="frozen_vision", lr=3e-3)
    raw["model"] = {"recipe": "softprompt_llm", "preset": "tiny", "lm_lora": False, "num_prefix_tokens": 4}
    spec, summary, model_dir, start = run(raw)

    assert not (model_dir / "lm_adapter").exists()
    AutoModelForCausalLM.from_pretrained(model_dir / "lm")  # the whole fine-tuned LM, loadable on its own
    lm_before, lm_after = load_file(start / "lm" / "model.safetensors"), load_file(model_dir / "lm" / "model.safetensors")
    moved, total = changed(lm_before, lm_after, "")
    assert moved > 0.9 * total, (moved, total)
    vision_before = load_file(start / "vision" / "model.safetensors")
    vision_after = load_file(model_dir / "vision" / "model.safetensors")
    assert changed(vision_before, vision_after, "") == (0, len(vision_before))  # BatchNorm statistics included
    assert mean_row_loss(build_recipe(spec), spec, str(model_dir)) == pytest.approx(summary["best_val_loss"], rel=1e-4)
