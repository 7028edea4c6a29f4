"""The trainable-parameter report a train stage prints at start and stores in its summary: the published BLIP-2
LoRA setting trains 0.05–0.2 % of the model (5,242,880 adapter weights at r 16 on the OPT q/k projections)."""
from __future__ import annotations

import pytest
import torch

from medvl.models.base import describe_parameters, parameter_report
from medvl.spec import parse_spec


def test_blip2_opt_2_7b_lora_r16_on_q_k_trains_5_242_880_weights():
    """Built on the meta device (no memory, no download): the real architecture with the recipe's LoRA."""
    from peft import get_peft_model
    from transformers import Blip2ForConditionalGeneration

    from medvl.models.architectures import build_on_meta, real_config
    from medvl.models.lora import lora_config, scoped_targets, target_modules

    model = build_on_meta(real_config("Salesforce/blip2-opt-2.7b"), Blip2ForConditionalGeneration)
    base_total = parameter_report(model)["total_params"]
    settings = parse_spec({"name": "t", "output_dir": "o", "stages": ["train"],
                           "model": {"recipe": "blip2", "lora_r": 16, "lora_target_modules": ["q_proj", "k_proj"]},
                           "train": {"finetune": "lora"}}).model
    targets = scoped_targets("language_model", target_modules(settings, "opt"))
    with torch.device("meta"):
        peft_model = get_peft_model(model, lora_config(settings, targets))
    report = parameter_report(peft_model)
    assert report["trainable_params"] == 16 * (2560 + 2560) * 2 * 32 == 5_242_880
    assert report["total_params"] == base_total + 5_242_880
    assert 0.05 <= report["trainable_percent"] <= 0.2, report
    assert describe_parameters(report) == (f"trainable parameters: 5,242,880 of {base_total + 5_242_880:,} "
                                           f"({report['trainable_percent']:.3f} %)")


def test_report_counts_shared_weights_once_and_partitioned_ones_at_full_size():
    layer = torch.nn.Linear(4, 4)  # 20 weights
    frozen = torch.nn.Linear(4, 2).requires_grad_(False)  # 10 weights
    tied = torch.nn.Sequential(layer, frozen, layer)
    assert parameter_report(tied) == {"trainable_params": 20, "total_params": 30,
                                      "trainable_percent": pytest.approx(200 / 3)}
    frozen.weight.ds_numel = 1000  # what ZeRO-3 leaves on a partitioned parameter: its full size
    assert parameter_report(tied)["total_params"] == 20 + 1000 + 2
