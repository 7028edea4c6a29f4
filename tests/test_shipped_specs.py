"""The shipped job specs say what the published methods did: each setting a write-up fixed is checked here, so a
spec edit that drifts from its write-up fails (jobs/*.yaml; the README's recipe table says what each cannot do)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from medvl.spec import load_spec, parse_spec
from medvl.validation import load_valid_spec, validate

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def stages(spec) -> dict:
    return {stage.name: spec.for_stage(stage) for stage in spec.stages}


@pytest.mark.parametrize("path", sorted(JOBS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_spec_passes_its_recipes_checks(path: Path):
    assert load_valid_spec(path).stages


def test_vqarad_dapt_runs_on_rocov2_radiology_with_the_write_ups_settings():
    spec = load_spec(JOBS / "vqarad_blip_dapt.yaml")
    by_name = stages(spec)
    rocov2, dapt, vqa = by_name["prepare_rocov2"], by_name["dapt"], by_name["vqa"]
    assert (rocov2.data.format, rocov2.data.modalities) == ("rocov2", ["ct", "mri", "xray"])
    assert rocov2.data.task == dapt.data.task == "caption"
    assert dapt.data.format == "shards" and dapt.shards_location == rocov2.shards_location != vqa.shards_location
    assert rocov2.shards_location == "runs/vqarad_blip_dapt/rocov2_shards"
    train = dapt.train
    assert (train.epochs, train.batch_size, train.grad_accum) == (2, 16, 4)
    assert (train.lr, train.warmup_start_lr, train.min_lr) == (4e-7, 5e-9, 1e-9)
    assert (train.weight_decay, train.max_grad_norm, train.gradient_checkpointing) == (0.02, 1.0, True)
    assert dapt.data.image_size == 224 and vqa.data.image_size == 384
    assert (dapt.model.recipe, dapt.model.distill, dapt.model.itc_queue_size) == ("blip_dapt", True, 256)
    assert spec.stages[3].start_from == "dapt" and vqa.train.finetune == "frozen_vision"


def test_vqarad_rocov2_shards_move_with_output_dir_and_the_pseudo_caption_fallback_validates(tmp_path: Path):
    spec = load_spec(JOBS / "vqarad_blip_dapt.yaml", [f"output_dir={tmp_path}"])
    assert stages(spec)["dapt"].shards_location == str(tmp_path / "rocov2_shards")
    raw = yaml.safe_load((JOBS / "vqarad_blip_dapt.yaml").read_text())  # as the spec's comment says to edit it
    raw["stages"] = [s for s in raw["stages"] if not (isinstance(s, dict) and s.get("name") == "prepare_rocov2")]
    dapt = next(s for s in raw["stages"] if isinstance(s, dict) and s.get("name") == "dapt")
    for key in ("data.format", "data.shards", "data.task"):
        del dapt["set"][key]
    fallback = stages(validate(parse_spec(raw)))["dapt"]
    assert fallback.data.format == "vqa_rad" and fallback.shards_location.endswith("vqarad_blip_dapt/shards")


def test_mimic_blip2_lora_takes_the_write_ups_data_and_prompted_zero_shot_row():
    spec = load_spec(JOBS / "mimic_blip2_lora.yaml")
    data = spec.data
    assert (data.max_studies, data.resplit, data.frontal_only, data.split_fractions) == (30633, True, True,
                                                                                        [0.8, 0.1, 0.1])
    assert spec.eval.baselines[0] == "zero_shot" and spec.eval.prompt == "Describe the findings in this chest X-ray:"
    assert "5,242,880" in (JOBS / "mimic_blip2_lora.yaml").read_text() and "2.6M" not in (
        JOBS / "mimic_blip2_lora.yaml").read_text()


@pytest.mark.parametrize("name", ["mimic_softprompt_llm.yaml", "mimic_softprompt_openllama.yaml"])
def test_soft_prompt_freezes_the_vision_encoder_for_one_epoch_then_unfreezes(name: str):
    spec = load_spec(JOBS / name)
    by_name = stages(spec)
    assert (by_name["stage1"].train.finetune, by_name["stage1"].train.epochs) == ("frozen_vision", 1)
    assert by_name["stage2"].train.finetune == "full" and spec.stages[2].start_from == "stage1"


def test_the_openllama_lora_spec_and_its_comment_agree_with_the_architecture():
    """LoRA r 16 on OpenLLaMA-7B's q/v projections: the adapter count the comment quotes, on the meta device."""
    import torch
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    from medvl.models.architectures import build_on_meta, real_config
    from medvl.models.lora import lora_config, target_modules

    spec = load_spec(JOBS / "mimic_softprompt_openllama.yaml")
    model = spec.model
    assert (model.name_or_path, model.lora_target_modules, model.dtype, model.lm_lora) == (
        "openlm-research/open_llama_7b", ["q_proj", "v_proj"], "bfloat16", True)
    assert spec.train.precision == "bf16"
    llama = build_on_meta(real_config(model.name_or_path), LlamaForCausalLM)
    with torch.device("meta"):
        adapted = get_peft_model(llama, lora_config(model, target_modules(model, "llama")))
    adapters = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert adapters == 32 * 2 * 16 * (4096 + 4096) == 8_388_608
    comment = (JOBS / "mimic_softprompt_openllama.yaml").read_text()
    assert f"{adapters:,}" in comment and re.search(r"stage 2 15\.61 \(22\.64\)", comment)


def test_medblip_on_roco_trains_one_to_three_epochs_with_early_stopping():
    spec = load_spec(JOBS / "roco_blip_caption.yaml")
    train = spec.train
    assert train.epochs == 3 and train.early_stopping_patience == 1 and train.eval_every_steps == 0
    assert spec.eval.semantic and spec.eval.embedding_model == ""  # a local clinical encoder folder goes here
