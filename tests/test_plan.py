"""``medvl plan``: counts from the recipes' own policies on the meta device, DeepSpeed's model-state figures,
and the activation formula. Fast, no Ray, nothing allocated."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from medvl.plan import (
    CARDS_GIB,
    CUDA_RESERVE_GIB,
    GIB,
    MetaModel,
    Tower,
    activation_bytes,
    build_meta_model,
    canonical_recipe,
    layer_bytes,
    model_states,
    causal_lm_tower,
    plan_job,
    plan_spec,
    training_flops,
)
from medvl.models.architectures import build_known_on_meta, is_on_meta
from medvl.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
BLIP2_LORA = str(ROOT / "jobs" / "mimic_blip2_lora.yaml")
ROCO_FULL = str(ROOT / "jobs" / "roco_blip_caption.yaml")
LORA_R16_OPT_QK = 16 * (2560 + 2560) * 2 * 32  # r × (in + out) × {q, k} × layers


@pytest.fixture(scope="module")
def blip2_lora_plan():
    return plan_spec(load_spec(BLIP2_LORA), gpus=[8])


def test_blip2_lora_anchors(blip2_lora_plan):
    assert blip2_lora_plan.params_trainable == LORA_R16_OPT_QK == 5_242_880
    assert abs(blip2_lora_plan.params_total - 3.74e9) / 3.74e9 < 0.02
    # the frozen 3.74 B base plus the adapters, nothing counted twice (OPT's tied embeddings once)
    assert blip2_lora_plan.params_total == 3_744_761_856 + 5_242_880


def test_the_planned_model_is_never_allocated():
    meta = build_meta_model(load_spec(BLIP2_LORA))
    tensors = [*meta.model.parameters(), *meta.model.buffers()]
    assert tensors and all(t.device.type == "meta" for t in tensors)
    assert is_on_meta(meta.model)
    # the LoRA adapters are the only trainable tensors, and they sit in the language model's q/k projections
    trainable = [name for name, p in meta.model.named_parameters() if p.requires_grad]
    assert trainable and all(re.search(r"language_model\..*\.(q_proj|k_proj)\.lora_[AB]\.", n) for n in trainable)


def test_both_blip2_recipe_names_plan_the_same_model():
    spec = load_spec(BLIP2_LORA)
    renamed = dataclasses.replace(spec, model=dataclasses.replace(spec.model, recipe="blip2"))
    assert canonical_recipe("blip2_lora") == canonical_recipe("blip2") == "blip2"
    assert plan_spec(renamed).params_trainable == plan_spec(spec).params_trainable == 5_242_880


@pytest.mark.parametrize("policy, trainable", [
    ("full", 3_744_761_856),
    ("frozen_vision", 3_744_761_856 - 985_952_256),  # all but the ViT
])
def test_blip2_policies_come_from_the_recipe(policy, trainable):
    plan = plan_spec(load_spec(BLIP2_LORA, [f"train.finetune={policy}"]))
    assert (plan.params_total, plan.params_trainable) == (3_744_761_856, trainable)


def test_softprompt_lm_trains_whole_without_lora():
    overrides = ["model.name_or_path=openlm-research/open_llama_7b", "model.lm_lora=false"]
    stage2 = plan_job(load_spec(str(ROOT / "jobs" / "mimic_softprompt_llm.yaml"), overrides))[-1]
    assert stage2.params_trainable == stage2.params_total > 6_738_415_616 + 23_508_032  # + the mapper


# --------------------------------------------------------------------------------------------- DeepSpeed


def deepspeed_gpu_gib(estimator, **kwargs) -> dict[str, float]:
    """Per-GPU GiB by options line, parsed from what DeepSpeed's ``*_all_cold`` estimator prints
    ("  12.34GB |   5.67GB | offload_optimizer=none"; its "GB" are 2^30 bytes)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        estimator(**kwargs)
    rows = re.findall(r"^\s*[\d.]+GB \|\s*([\d.]+)GB \| (.+?)\s*$", buffer.getvalue(), flags=re.M)
    assert rows, buffer.getvalue()
    return {re.sub(r"\s+|OffloadDeviceEnum\.", "", options): float(gpu) for gpu, options in rows}


@pytest.fixture(scope="module")
def estimators():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    return estimate_zero2_model_states_mem_needs_all_cold, estimate_zero3_model_states_mem_needs_all_cold


def deepspeed_figures(estimators, params: int, largest_layer: int, gpus: int) -> dict[str, float]:
    zero2, zero3 = estimators
    two = deepspeed_gpu_gib(zero2, total_params=params, num_gpus_per_node=gpus)
    three = deepspeed_gpu_gib(zero3, total_params=params, largest_layer_params=largest_layer, num_gpus_per_node=gpus)
    return {
        "zero2": two["offload_optimizer=none"],
        "zero3": three["offload_param=none,offload_optimizer=none,zero_init=1"],
        "zero3_offload": three["offload_param=cpu,offload_optimizer=cpu,zero_init=1"],
    }


def close(ours: float, theirs: float, tolerance: float = 0.05) -> bool:
    return abs(ours - theirs) <= tolerance * theirs


@pytest.mark.parametrize("gpus", [1, 8])
@pytest.mark.parametrize("path, overrides", [(ROCO_FULL, []), (BLIP2_LORA, ["train.finetune=full"])])
def test_full_finetuning_model_states_match_deepspeed(estimators, path, overrides, gpus):
    """Every parameter trains (train.finetune full): DeepSpeed's all-cold estimators, which assume exactly that,
    apply as they are."""
    plan = plan_spec(load_spec(path, overrides), gpus=[gpus])
    assert plan.params_trainable == plan.params_total
    theirs = deepspeed_figures(estimators, plan.params_total, plan.largest_layer_params, gpus)
    for strategy, figure in theirs.items():
        assert close(plan.memory_gib[strategy].model_states, figure), (strategy, plan.memory_gib[strategy], figure)


@pytest.mark.parametrize("gpus", [1, 8])
def test_lora_model_states_match_deepspeed_apples_to_apples(estimators, blip2_lora_plan, gpus):
    """LoRA: DeepSpeed's all-cold estimators assume every parameter trains, so 20 bytes per parameter would be
    charged to the 3.74 B frozen ones. Apples to apples: DeepSpeed's figure for a model made of the trainable
    parameters alone, plus the 16-bit copy of the frozen weights that every strategy keeps (ZeRO-2 whole on
    each GPU, ZeRO-3 partitioned N ways, ZeRO-3 + offload on the CPU)."""
    plan = plan_spec(load_spec(BLIP2_LORA), gpus=[gpus])
    frozen = plan.params_total - plan.params_trainable
    theirs = deepspeed_figures(estimators, plan.params_trainable, plan.largest_layer_params, gpus)
    frozen_16bit = {"zero2": 2 * frozen, "zero3": 2 * frozen / gpus, "zero3_offload": 0.0}
    for strategy, figure in theirs.items():
        expected = figure + frozen_16bit[strategy] / GIB
        assert close(plan.memory_gib[strategy].model_states, expected), (strategy, plan.memory_gib[strategy])
    # and the all-trainable estimator would have been far off: the comparison above is the meaningful one
    naive = deepspeed_figures(estimators, plan.params_total, plan.largest_layer_params, gpus)["zero2"]
    assert plan.memory_gib["zero2"].model_states < 0.5 * naive


def test_model_states_reduce_to_deepspeeds_formulas_when_everything_trains():
    psi, big = 3_750_000_000, 128_778_240
    for n in (1, 4, 8):
        assert model_states("zero2", psi, psi, big, n, True, 4).total == pytest.approx(2 * psi + 18 * psi / n)
        assert model_states("zero3", psi, psi, big, n, True, 4).total == pytest.approx(4 * big + 18 * psi / n)
        offload = model_states("zero3_offload", psi, psi, big, n, True, 4)
        assert offload.total == 4 * big and offload.cpu == pytest.approx(18 * psi * 1.5)


def test_ddp_keeps_bucket_copies_of_gradients_only_across_gpus():
    one, two = (model_states("ddp", 1000, 100, 10, n, True, 4) for n in (1, 2))
    assert (one.weights, one.gradients, one.optimizer) == (4000, 400, 800)
    assert two.gradients == 800


def test_ddp_keeps_frozen_weights_in_model_dtype_and_trainable_ones_in_fp32():
    bf16 = model_states("ddp", 1000, 100, 10, 1, True, weight_bytes=2)
    assert (bf16.weights, bf16.gradients, bf16.optimizer) == (2 * 900 + 4 * 100, 400, 800)
    kept = model_states("ddp", 1000, 100, 10, 1, True, weight_bytes=2, frozen_fp32=300)
    assert kept.weights == 2 * 600 + 4 * 300 + 4 * 100


def test_blip2_qformer_stays_fp32_under_ddp_with_bf16_weights():
    bf16 = plan_spec(load_spec(BLIP2_LORA, ["model.dtype=bfloat16"])).memory_gib["ddp"].weights
    fp32 = plan_spec(load_spec(BLIP2_LORA, ["model.dtype=float32"])).memory_gib["ddp"].weights
    qformer_and_queries = 105_137_664 + 32 * 768
    frozen = 3_744_761_856
    assert bf16 * GIB == 2 * (frozen - qformer_and_queries) + 4 * qformer_and_queries + 4 * 5_242_880
    assert fp32 * GIB == 4 * (frozen + 5_242_880)


def test_quantised_base_weights_are_planned_at_their_bits():
    states = {bits: plan_spec(load_spec(BLIP2_LORA, [f"model.load_in_{bits}bit=true"])) for bits in (8, 4)}
    bf16 = plan_spec(load_spec(BLIP2_LORA, ["model.dtype=bfloat16"])).memory_gib["ddp"].weights
    assert (states[8].weight_dtype, states[4].weight_dtype) == ("int8", "nf4")
    eight, four = (states[bits].memory_gib["ddp"].weights for bits in (8, 4))
    assert four < eight < bf16
    assert eight * GIB == 1 * 3_744_761_856 + 4 * 5_242_880 + 3 * (bf16 * GIB - 2 * 3_744_761_856 - 4 * 5_242_880) / 2


# --------------------------------------------------------------------------------------------- activations


def test_layer_formula_is_korthikantis_for_a_4h_ffn():
    s, h, a = 512, 1024, 16
    tower = Tower("lm", ("lm.",), layers=1, hidden=h, heads=a, ffn=4 * h, tokens=s)
    assert layer_bytes(tower, cross=False) == s * h * (34 + 5 * a * s / h)


def test_checkpointing_and_frozen_upstream_towers_cut_activations():
    vision = Tower("vision", ("v.",), layers=12, hidden=768, heads=12, ffn=3072, tokens=577)
    lm = Tower("lm", ("lm.",), layers=12, hidden=768, heads=12, ffn=3072, tokens=64, vocab=30524)
    both = activation_bytes([vision, lm], [True, True], batch=4, checkpointing=False, fp32=False)
    lm_only = activation_bytes([vision, lm], [False, True], batch=4, checkpointing=False, fp32=False)
    encoder_only = activation_bytes([vision, lm], [True, False], batch=4, checkpointing=False, fp32=False)
    assert lm_only < both and encoder_only == both  # a frozen tower downstream of a trained one keeps its graph
    assert activation_bytes([vision, lm], [True, True], 4, True, False) < both / 4
    assert activation_bytes([vision, lm], [True, True], 4, False, True) == 2 * both


def test_blip2_lora_stores_no_vision_or_qformer_activations(blip2_lora_plan):
    stored = {t["name"]: t["activations_stored"] for t in blip2_lora_plan.towers}
    assert stored == {"vision": False, "Q-Former": False, "language model": True}


def test_fit_verdicts_follow_the_totals(blip2_lora_plan):
    for plans in blip2_lora_plan.by_gpus.values():
        for p in plans.values():
            assert p.fits == {card: p.total + CUDA_RESERVE_GIB <= gib for card, gib in CARDS_GIB.items()}


def test_every_train_stage_is_planned_with_its_own_policy():
    plans = plan_job(load_spec(str(ROOT / "jobs" / "mimic_softprompt_llm.yaml")))
    by_stage = {p.stage: p for p in plans}
    assert list(by_stage) == ["stage1", "stage2"]
    resnet50 = 23_508_032
    assert by_stage["stage2"].params_trainable - by_stage["stage1"].params_trainable == resnet50
    assert by_stage["stage1"].params_total == by_stage["stage2"].params_total


# --------------------------------------------------------------------------------------------- FLOPs


@pytest.mark.parametrize("trains", [True, False])
def test_flops_follow_the_palm_accounting_for_gpt2(trains):
    """6 FLOPs per weight per token for the 12·L·h² block weights and the tied V·h head, plus 12·L·s²·h for
    attention (Chowdhery et al. 2022, appendix B); a frozen LM with nothing trainable upstream runs forward only."""
    lm = build_known_on_meta("gpt2").requires_grad_(trains)
    s, h, layers, vocab = 200, 768, 12, 50257
    flops = training_flops(MetaModel(lm, [causal_lm_tower("lm", ("transformer.", "lm_head"), lm.config, s)]))
    forward = 2 * 12 * layers * h * h * s + 2 * vocab * h * s + 4 * layers * s * s * h
    assert flops.forward_per_sample == forward
    assert flops.train_per_sample == (3 * forward if trains else forward)
    assert flops.tokens_per_sample == s


def test_lora_costs_forward_plus_input_gradients_of_the_frozen_lm(blip2_lora_plan):
    full = plan_spec(load_spec(BLIP2_LORA, ["train.finetune=full"]))
    # the frozen ViT runs forward only (2 of 6) and the LM skips its weight gradients (4 of 6): about 60 %
    assert 0.5 < blip2_lora_plan.train_flops_per_sample / full.train_flops_per_sample < 0.7


# --------------------------------------------------------------------------------------------- the command


def test_cli_json_without_ray():
    """`medvl plan --json` in a fresh interpreter where importing Ray fails: one JSON object on stdout."""
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from medvl.cli import main\n"
        f"sys.exit(main(['plan', {BLIP2_LORA!r}, '--json', '--gpus', '8']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout)
    assert out["params_trainable"] == 5_242_880
    assert set(out["memory_gib"]) == {"ddp", "zero2", "zero3", "zero3_offload"}
    assert out["gpus"] == 8 and set(out["by_gpus"]) == {"1", "8"}
    assert out["memory_gib"]["zero3"]["model_states"] < out["by_gpus"]["1"]["zero3"]["model_states"]


def test_cli_names_the_field_for_an_unknown_architecture(capsys):
    from medvl.cli import main

    assert main(["plan", BLIP2_LORA, "--set", "model.name_or_path=facebook/opt-13b"]) == 2
    assert "model.name_or_path: no shipped architecture for 'facebook/opt-13b'" in capsys.readouterr().err
