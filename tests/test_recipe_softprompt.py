"""Soft-prompt recipe: position code, attention share, freezing per stage, LoRA count, save → stage 2 load."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, ResNetModel

from medvl.models.base import GenerationSettings
from medvl.data.synthetic import synthetic_records
from medvl.models.softprompt_llm import (
    SoftPromptRecipe,
    grid_position_code,
    prefix_attention_share,
    save_tiny_parts,
    text_labels,
)
from medvl.spec import parse_spec
from tests.batches import shard_batch

IMAGE_SIZE = 32
R = 4
PREFIX = 3


def job(tmp_path: Path, lm_dir: str, vision_dir: str, finetune: str = "frozen_vision", **model) -> dict:
    return {
        "name": "softprompt",
        "output_dir": str(tmp_path / "run"),
        "stages": ["train"],
        "data": {"image_size": IMAGE_SIZE, "max_text_length": 40},
        # preset "": the folders are loaded exactly as hub ids would be (from_pretrained)
        "model": {"recipe": "softprompt_llm", "name_or_path": lm_dir, "vision_name_or_path": vision_dir, "preset": "",
                  "num_prefix_tokens": PREFIX, "lora_r": R, "lora_alpha": 8, "lora_dropout": 0.0, **model},
        "train": {"finetune": finetune, "lr": 1e-2, "weight_decay": 0.0},
        "eval": {"num_beams": 2, "max_new_tokens": 5},
    }


@pytest.fixture(scope="module")
def records():
    return list(synthetic_records(6, image_size=48))


@pytest.fixture(scope="module")
def parts(tmp_path_factory, records) -> tuple[str, str]:
    """A tiny GPT-2 folder and a tiny ResNet folder, as hub checkpoints are laid out."""
    return save_tiny_parts(tmp_path_factory.mktemp("parts"), [r.text for r in records], IMAGE_SIZE)


def recipe_for(tmp_path, parts, finetune="frozen_vision", **model) -> SoftPromptRecipe:
    return SoftPromptRecipe(parse_spec(job(tmp_path, *parts, finetune=finetune, **model)))


def tensors(recipe, source: str, records) -> dict[str, torch.Tensor]:
    batch = recipe.preprocessor(source)(shard_batch(records))
    return {name: torch.as_tensor(batch[name]) for name in recipe.tensor_columns}


def train_steps(recipe, model, batch, steps: int = 2) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss, _ = recipe.loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def test_grid_position_code_by_hand():
    code = grid_position_code(1, 2, 6)  # one frequency (1.0) per coordinate; 6 % 4 = 2 zero columns
    expected = [[0, 1, 0, 1, 0, 0], [0, 1, math.sin(1), math.cos(1), 0, 0]]
    torch.testing.assert_close(code, torch.tensor(expected, dtype=torch.float32))


def test_prefix_attention_share_by_hand():
    prefix, text = 2, 3
    total = prefix + text
    causal_uniform = torch.tril(torch.ones(total, total))
    causal_uniform = causal_uniform / causal_uniform.sum(-1, keepdim=True)
    all_on_prefix = torch.zeros(total, total)
    all_on_prefix[:, 0] = 1.0
    layers = (causal_uniform.expand(1, 2, total, total), all_on_prefix.expand(1, 2, total, total))
    mask = torch.tensor([[1, 1, 0]])  # the third text position is padding
    # Uniform causal attention: position 2 gives 2/3 to the prefix, position 3 gives 2/4.
    assert prefix_attention_share(layers, prefix, mask) == pytest.approx([(2 / 3 + 2 / 4) / 2, 1.0])


def test_labels_mask_bos_and_padding():
    labels = text_labels(torch.tensor([[2, 7, 8, 3, 0]]), torch.tensor([[1, 1, 1, 1, 0]]))
    assert labels.tolist() == [[-100, 7, 8, 3, -100]]


def test_preprocessor_gives_square_images_and_bos_text_eos(parts, records, tmp_path):
    recipe = recipe_for(tmp_path, parts)
    batch = tensors(recipe, parts[0], records[:2])
    assert batch["pixel_values"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)  # 48 px images resized, not cropped
    ids, mask = batch["input_ids"], batch["attention_mask"]
    bos, eos, pad = 2, 3, 0  # the tiny tokenizer's [BOS], [SEP], [PAD]
    assert (ids[:, 0] == bos).all()
    for row in range(2):
        last = int(mask[row].sum()) - 1
        assert ids[row, last] == eos and (ids[row, last + 1 :] == pad).all()


def test_lora_parameter_count_and_default_targets(parts, tmp_path):
    model = recipe_for(tmp_path, parts).load_for_training(parts[0])
    lora = {n: p.numel() for n, p in model.lm.named_parameters() if p.requires_grad}
    assert lora and all(".c_attn.lora_" in n for n in lora)  # GPT-2's default target
    # c_attn maps 64 → 3·64: A is r×64, B is 192×r → r·(64+192) per layer, 2 layers.
    assert sum(lora.values()) == 2 * R * (64 + 192)
    assert not any(p.requires_grad for n, p in model.lm.named_parameters() if ".lora_" not in n)

    chosen = recipe_for(tmp_path, parts, lora_target_modules=["c_fc"]).load_for_training(parts[0])
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[1] for n, _ in chosen.lm.named_parameters() if ".lora_A." in n}
    assert adapted == {"c_fc"}


@pytest.mark.parametrize("policy", ["frozen_vision", "full"])
def test_a_step_trains_exactly_what_the_stage_policy_says(parts, records, tmp_path, policy):
    recipe = recipe_for(tmp_path, parts, finetune=policy)
    model = recipe.load_for_training(parts[0])
    before_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    before_vision = snapshot(model.vision)
    train_steps(recipe, model, tensors(recipe, parts[0], records[:4]))

    for name, parameter in model.named_parameters():
        vision_trains = policy == "full" and name.startswith("vision.")
        should_train = name.startswith("mapper.") or ".lora_" in name or vision_trains
        assert parameter.requires_grad == should_train, name
        assert (not torch.equal(before_params[name], parameter)) == should_train, name
    vision_unchanged = all(torch.equal(before_vision[k], v) for k, v in model.vision.state_dict().items())
    assert vision_unchanged == (policy == "frozen_vision")  # BatchNorm statistics included


def test_other_policies_are_refused(parts, tmp_path):
    with pytest.raises(ValueError, match="train.finetune: expected frozen_vision"):
        recipe_for(tmp_path, parts, finetune="lora").load_for_training(parts[0])


def test_stage_two_starts_from_what_stage_one_saved(parts, records, tmp_path):
    lm_dir, vision_dir = parts
    stage1 = recipe_for(tmp_path, parts)
    model = stage1.load_for_training(lm_dir)
    torch.testing.assert_close(  # the fresh model's encoder came from the vision folder via from_pretrained
        model.vision.state_dict(), ResNetModel.from_pretrained(vision_dir).state_dict())
    batch = tensors(stage1, lm_dir, records[:4])
    train_steps(stage1, model, batch)
    folder = tmp_path / "stage1"
    stage1.save(model, lm_dir, folder)

    config = json.loads((folder / "medvl_softprompt.json").read_text())
    assert config["base_lm"] == lm_dir and config["num_prefix_tokens"] == PREFIX
    assert config["vision_dim"] == 32 and config["lm_dim"] == 64
    for file in ("vision/config.json", "vision/preprocessor_config.json", "lm_adapter/adapter_config.json",
                 "mapper.safetensors", "tokenizer.json"):
        assert (folder / file).is_file(), file
    # Each piece is a plain HF/peft folder.
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lm_dir), folder / "lm_adapter")

    stage2 = recipe_for(tmp_path, parts, finetune="full")
    loaded = stage2.load_for_training(str(folder))
    for part in ("vision", "mapper"):
        torch.testing.assert_close(snapshot(getattr(loaded, part)), snapshot(getattr(model, part)), rtol=0, atol=0)
    lora = {n: p for n, p in model.lm.named_parameters() if ".lora_" in n}
    lora_loaded = {n: p for n, p in loaded.lm.named_parameters() if ".lora_" in n}
    assert lora.keys() == lora_loaded.keys() and all(torch.equal(lora[n], lora_loaded[n]) for n in lora)
    assert all(p.requires_grad for p in loaded.vision.parameters())

    resumed = stage1.load_for_training(lm_dir)  # restore(): a fresh model takes a checkpoint's weights
    stage1.restore(resumed, folder)
    for name, value in snapshot(model).items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert set(load_file(folder / "mapper.safetensors")) == set(model.mapper.state_dict())


def test_generation_and_prefix_attention_share_from_a_saved_model(parts, records, tmp_path):
    recipe = recipe_for(tmp_path, parts)
    model = recipe.load_for_training(parts[0])
    folder = tmp_path / "saved"
    recipe.save(model, parts[0], folder)
    inference = recipe.load_for_inference(str(folder))
    batch = tensors(recipe, str(folder), records[:3])
    with torch.inference_mode():
        tokens = inference.module.generate(batch["pixel_values"], num_beams=2, max_new_tokens=5)
        scored = recipe.generate_scored(inference, batch, GenerationSettings.from_eval(recipe.spec.eval))
        metrics = recipe.extra_eval_metrics(inference.module, batch)
    texts = scored.texts
    assert tokens.shape[0] == 3 and tokens.shape[1] <= 5  # only new tokens come back, not the prefix
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert all(0.0 < p < 1.0 for p in scored.mean_token_probs)
    layers = [metrics[f"prefix_attention_share_layer_{i}"] for i in range(2)]
    assert set(metrics) == {"prefix_attention_share"} | {f"prefix_attention_share_layer_{i}" for i in range(2)}
    assert all(0 < share < 1 for share in layers)
    assert metrics["prefix_attention_share"] == pytest.approx(sum(layers) / 2)


@pytest.mark.slow
def test_two_stages_on_ray_lower_the_loss_and_report_prefix_attention(tmp_path, ray_local):
    from medvl.stages import run_stages

    spec = parse_spec({
        "name": "softprompt_e2e",
        "output_dir": str(tmp_path / "run"),
        "stages": ["prepare",
                   {"kind": "train", "name": "stage1", "set": {"train.finetune": "frozen_vision"}},
                   {"kind": "train", "name": "stage2", "start_from": "stage1",
                    "set": {"train.finetune": "full", "train.lr": 1e-3, "train.epochs": 1}},
                   "eval"],
        "data": {"format": "synthetic", "synthetic_images": 160, "synthetic_image_size": 48, "image_size": IMAGE_SIZE,
                 "max_text_length": 40, "records_per_shard": 80, "shuffle_buffer": 0},
        "model": {"recipe": "softprompt_llm", "preset": "tiny", "num_prefix_tokens": 4},
        "train": {"epochs": 2, "batch_size": 16, "lr": 3e-3, "workers": 1, "cpus_per_worker": 0.5,
                  "early_stopping_patience": 0},
        "eval": {"num_beams": 1, "max_new_tokens": 8, "max_samples": 8},
    })
    run_stages(spec)
    out = Path(spec.output_dir)
    stage1 = json.loads((out / "stage1" / "train_summary.json").read_text())
    stage2 = json.loads((out / "stage2" / "train_summary.json").read_text())
    assert stage2["model_source"] == stage1["model_dir"]
    assert stage1["history"][-1]["val_loss"] < stage1["history"][0]["val_loss"]
    assert stage2["best_val_loss"] < stage1["history"][0]["val_loss"]
    assert (Path(stage2["model_dir"]) / "medvl_softprompt.json").is_file()
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 8
    # eval.calibrate (on by default): T saved beside the stage-2 model; token and finding ECE before and after
    assert metrics["temperature"] == json.loads((Path(stage2["model_dir"]) / "calibration.json").read_text())[
        "temperature"]
    assert {"token_ece_before", "token_ece_after", "ce_finding_ece_before", "ce_finding_ece"} <= metrics.keys()
    layers = [metrics[f"prefix_attention_share_layer_{i}"] for i in range(2)]
    assert all(0 < share < 1 for share in layers)
    assert metrics["prefix_attention_share"] == pytest.approx(sum(layers) / 2)


def test_the_whole_lm_trains_without_lora_and_saves_as_a_plain_causal_lm(parts, records, tmp_path):
    lm_dir, _ = parts
    recipe = recipe_for(tmp_path, parts, lm_lora=False)
    model = recipe.load_for_training(lm_dir)
    assert not isinstance(model.lm, PeftModel) and all(p.requires_grad for p in model.lm.parameters())
    before = snapshot(model.lm)
    train_steps(recipe, model, tensors(recipe, lm_dir, records[:4]))
    assert all(not torch.equal(before[n], v) for n, v in model.lm.named_parameters())  # every LM weight moved
    folder = tmp_path / "full_lm"
    recipe.save(model, lm_dir, folder)
    assert (folder / "lm" / "model.safetensors").is_file() and not (folder / "lm_adapter").exists()
    torch.testing.assert_close(snapshot(AutoModelForCausalLM.from_pretrained(folder / "lm")), snapshot(model.lm))

    # A LoRA stage can start from it: the fully trained LM becomes the base of a fresh adapter.
    lora = recipe_for(tmp_path, parts)
    continued = lora.load_for_training(str(folder))
    assert isinstance(continued.lm, PeftModel)
    base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
            for n, p in continued.lm.named_parameters() if ".lora_" not in n}
    assert all(torch.equal(base[n], v) for n, v in model.lm.named_parameters())
    resumed = recipe.load_for_training(lm_dir)  # restore(): a fresh whole-LM model takes the checkpoint's weights
    recipe.restore(resumed, folder)
    assert all(torch.equal(v, snapshot(resumed.lm)[n]) for n, v in snapshot(model.lm).items())


def test_a_whole_lm_stage_merges_the_adapter_a_lora_stage_saved(parts, records, tmp_path):
    lm_dir, _ = parts
    stage1 = recipe_for(tmp_path, parts)
    model = stage1.load_for_training(lm_dir)
    batch = tensors(stage1, lm_dir, records[:3])
    train_steps(stage1, model, batch)
    folder = tmp_path / "lora_stage"
    stage1.save(model, lm_dir, folder)
    with torch.no_grad():
        expected = model.eval()(**batch).logits
    whole = recipe_for(tmp_path, parts, lm_lora=False).load_for_training(str(folder))
    assert not isinstance(whole.lm, PeftModel) and all(p.requires_grad for p in whole.lm.parameters())
    with torch.no_grad():
        torch.testing.assert_close(whole.eval()(**batch).logits, expected, atol=1e-4, rtol=1e-4)


def test_lm_lora_false_is_refused_for_other_recipes(tmp_path):
    from medvl.spec import SpecError
    from medvl.validation import validate

    raw = job(tmp_path, "lm", "vision", lm_lora=False)
    raw["model"] = {"recipe": "blip2", "name_or_path": "lm", "lm_lora": False}
    raw["train"]["finetune"] = "lora"
    with pytest.raises(SpecError, match="model.lm_lora: recipe blip2 does not read it"):
        validate(parse_spec(raw))
