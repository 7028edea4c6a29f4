"""BLIP-2 recipe: ids layout, adapter placement and count, freezing per policy (lora, frozen_vision, full),
8- and 4-bit errors and settings, adapter/merged/full save, the deprecated name."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import Blip2Config, Blip2ForConditionalGeneration

from medvl.models.base import GenerationSettings
from medvl.data.synthetic import synthetic_records
from medvl.models.blip2 import (
    Blip2Recipe,
    apply_blip2_policy,
    blip2_labels,
    export_merged,
    save_tiny_blip2,
)
from medvl.spec import parse_spec
from tests.batches import shard_batch

IMAGE_SIZE = 32
R = 4


def job(model_dir: str, tmp_path: Path, **model) -> dict:
    return {
        "name": "blip2",
        "output_dir": str(tmp_path / "run"),
        "stages": ["train"],
        "data": {"image_size": IMAGE_SIZE, "max_text_length": 40},
        # preset "": the model folder is loaded exactly as a hub id would be (from_pretrained)
        "model": {"recipe": "blip2", "name_or_path": model_dir, "preset": "", "lora_r": R, "lora_alpha": 8,
                  "lora_dropout": 0.0, **model},
        "train": {"finetune": "lora", "lr": 1e-2, "weight_decay": 0.0},
        "eval": {"num_beams": 2, "max_new_tokens": 6},
    }


@pytest.fixture(scope="module")
def records():
    return list(synthetic_records(8, image_size=48))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, records) -> str:
    return save_tiny_blip2(tmp_path_factory.mktemp("blip2"), [r.text for r in records], IMAGE_SIZE)


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


def test_ids_start_with_one_image_token_per_query_and_labels_mask_them(tiny_dir, records, tmp_path):
    recipe = Blip2Recipe(parse_spec(job(tiny_dir, tmp_path)))
    batch = tensors(recipe, tiny_dir, records[:2])
    config = Blip2Config.from_pretrained(tiny_dir)
    q, image_id = config.num_query_tokens, config.image_token_index
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == (2, q + 40) and batch["pixel_values"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert (ids[:, :q] == image_id).all() and (ids[:, q] == config.text_config.bos_token_id).all()
    for row in range(2):
        last = int(mask[row].sum()) - 1
        assert ids[row, last] == config.text_config.eos_token_id and (mask[row, : last + 1] == 1).all()
        assert (ids[row, last + 1 :] == config.text_config.pad_token_id).all()

    labels = blip2_labels(torch.tensor([[9, 9, 2, 5, 3, 0]]), torch.tensor([[1, 1, 1, 1, 1, 0]]), image_token_index=9)
    assert labels.tolist() == [[-100, -100, 2, 5, 3, -100]]


def test_lora_goes_on_the_language_model_only_with_r_times_d_plus_k_parameters(tiny_dir, tmp_path):
    # "query"/"key" are Q-Former names and "qkv" the vision tower's: the language_model scope must skip them.
    targets = ["q_proj", "k_proj", "query", "qkv"]
    recipe = Blip2Recipe(parse_spec(job(tiny_dir, tmp_path, lora_target_modules=targets)))
    model = recipe.load_for_training(tiny_dir)
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".language_model." in name and ".lora_" in name for name in trainable)
    assert {name.split(".lora_")[0].rsplit(".", 1)[1] for name in trainable} == {"q_proj", "k_proj"}
    # OPT hidden 64: q_proj and k_proj are 64×64; A is r×64, B is 64×r → r·(64+64) each; 2 per layer, 2 layers.
    assert sum(trainable.values()) == 2 * 2 * R * (64 + 64)


def test_default_targets_are_q_and_k_projections(tiny_dir, tmp_path):
    model = Blip2Recipe(parse_spec(job(tiny_dir, tmp_path))).load_for_training(tiny_dir)
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[1] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert adapted == {"q_proj", "k_proj"}


def test_a_step_changes_every_adapter_weight_and_nothing_else(tiny_dir, records, tmp_path):
    recipe = Blip2Recipe(parse_spec(job(tiny_dir, tmp_path)))
    model = recipe.load_for_training(tiny_dir)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train_steps(recipe, model, tensors(recipe, tiny_dir, records[:4]))  # 2 steps: lora_A's grad is 0 while B is 0
    for name, parameter in model.named_parameters():
        changed = not torch.equal(before[name], parameter)
        assert changed == parameter.requires_grad, name
    assert not any(p.requires_grad for n, p in model.named_parameters() if "vision_model" in n or "qformer" in n)


@pytest.mark.parametrize("policy", ["decoder", "encoder"])
def test_policies_blip2_has_no_name_for_are_refused(tiny_dir, tmp_path, policy):
    raw = job(tiny_dir, tmp_path)
    raw["train"]["finetune"] = policy
    with pytest.raises(ValueError, match=f"train.finetune: expected lora, frozen_vision or full for the blip2 recipe, "
                                         f"got '{policy}'"):
        Blip2Recipe(parse_spec(raw)).load_for_training(tiny_dir)


@pytest.mark.parametrize("policy", ["frozen_vision", "full"])
def test_a_full_policy_step_trains_exactly_the_parts_it_names(tiny_dir, records, tmp_path, policy):
    raw = job(tiny_dir, tmp_path)
    raw["train"]["finetune"] = policy
    recipe = Blip2Recipe(parse_spec(raw))
    model = recipe.load_for_training(tiny_dir)
    assert not isinstance(model, PeftModel) and not any("lora" in name for name, _ in model.named_parameters())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train_steps(recipe, model, tensors(recipe, tiny_dir, records[:4]))
    for name, parameter in model.named_parameters():
        trains = policy == "full" or not name.startswith("vision_model.")
        assert parameter.requires_grad == trains, name
        assert (not torch.equal(before[name], parameter)) == trains, name
    parts = ("language_model.", "qformer.", "query_tokens", "language_projection.")
    assert all(any(p.requires_grad for n, p in model.named_parameters() if n.startswith(part)) for part in parts)


def test_the_policy_function_works_on_the_meta_device(tiny_dir):
    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(Blip2Config.from_pretrained(tiny_dir))
    apply_blip2_policy(model, "frozen_vision")
    vision = sum(p.numel() for n, p in model.named_parameters() if n.startswith("vision_model."))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in model.parameters()) - vision and vision > 0


def test_8bit_is_refused_for_full_fine_tuning(tiny_dir, tmp_path):
    raw = job(tiny_dir, tmp_path, load_in_8bit=True)
    raw["train"].update(finetune="full", use_gpu=True)
    with pytest.raises(ValueError, match="model.load_in_8bit: expected false with train.finetune full"):
        Blip2Recipe(parse_spec(raw)).load_for_training(tiny_dir)


def test_the_old_recipe_name_selects_the_same_recipe_and_says_so_once(tiny_dir, tmp_path, capsys):
    from medvl.models import registry

    registry._warned.clear()
    raw = job(tiny_dir, tmp_path)
    raw["model"]["recipe"] = "blip2_lora"
    first, second = registry.build_recipe(parse_spec(raw)), registry.build_recipe(parse_spec(raw))
    assert type(first) is type(second) is Blip2Recipe
    lines = [line for line in capsys.readouterr().err.splitlines() if "deprecated" in line]
    assert lines == ["warning: model.recipe: 'blip2_lora' is deprecated, use 'blip2' (same recipe; train.finetune "
                     "picks lora or full)"]


def test_a_full_fine_tune_saves_a_plain_folder_and_can_start_from_a_lora_stage(tiny_dir, records, tmp_path):
    lora = Blip2Recipe(parse_spec(job(tiny_dir, tmp_path)))
    adapted = lora.load_for_training(tiny_dir)
    batch = tensors(lora, tiny_dir, records[:3])
    train_steps(lora, adapted, batch)
    adapter_dir = tmp_path / "adapter"
    lora.save(adapted, tiny_dir, adapter_dir)
    inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    with torch.no_grad():
        expected = adapted.eval()(**inputs).logits

    raw = job(tiny_dir, tmp_path)
    raw["train"]["finetune"] = "full"
    full = Blip2Recipe(parse_spec(raw))
    model = full.load_for_training(str(adapter_dir))  # the adapter is merged into the base, then everything trains
    assert not isinstance(model, PeftModel) and all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**inputs).logits, expected, atol=1e-4, rtol=1e-4)
    train_steps(full, model, batch)
    folder = tmp_path / "full"
    full.save(model, str(adapter_dir), folder)
    assert not (folder / "adapter_config.json").exists() and (folder / "tokenizer.json").is_file()
    with torch.no_grad():
        trained = model.eval()(**inputs).logits
        reloaded = full.load_for_inference(str(folder)).module
        torch.testing.assert_close(reloaded(**inputs).logits, trained)
    resumed = full.load_for_training(tiny_dir)  # restore(): a fresh model takes a full checkpoint's weights
    full.restore(resumed, folder)
    for (name, a), (_, b) in zip(resumed.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where there is no CUDA GPU")
@pytest.mark.parametrize("bits", ["8", "4"])
def test_quantised_loading_without_cuda_says_what_to_do(tiny_dir, tmp_path, bits):
    raw = job(tiny_dir, tmp_path, **{f"load_in_{bits}bit": True})
    raw["train"]["use_gpu"] = True  # a GPU spec run where there is none
    recipe = Blip2Recipe(parse_spec(raw))
    field = f"model.load_in_{bits}bit"
    what_to_do = rf"{field} needs a CUDA GPU and the bitsandbytes package: set {field}: false"
    with pytest.raises(RuntimeError, match=what_to_do):
        recipe.load_for_training(tiny_dir)
    with pytest.raises(RuntimeError, match=what_to_do):
        recipe.load_for_inference(tiny_dir)


@pytest.mark.parametrize("model, train, message", [
    ({"load_in_4bit": True}, {}, "model.load_in_4bit: expected false while train.use_gpu is false"),
    ({"load_in_8bit": True}, {}, "model.load_in_8bit: expected false while train.use_gpu is false"),
    ({"load_in_4bit": True, "load_in_8bit": True}, {"use_gpu": True}, "model.load_in_4bit: expected false while "
                                                                      "model.load_in_8bit is true"),
    ({"load_in_4bit": "nf4"}, {}, 'model.load_in_4bit: expected true or false, got "nf4"'),
])
def test_quantisation_settings_are_refused_where_they_cannot_run(tiny_dir, tmp_path, model, train, message):
    from medvl.spec import SpecError

    raw = job(tiny_dir, tmp_path, **model)
    raw["train"].update(train)
    with pytest.raises(SpecError, match=message):
        parse_spec(raw)


def test_4bit_is_lora_only_and_qlora_settings_are_nf4_with_double_quantisation(tiny_dir, tmp_path):
    from medvl.models.lora import quantisation_config
    from medvl.validation import validate

    raw = job(tiny_dir, tmp_path, load_in_4bit=True)
    raw["train"].update(use_gpu=True, finetune="full")
    with pytest.raises(Exception, match="model.load_in_4bit: expected it unset with train.finetune full"):
        validate(parse_spec(raw))
    raw["train"]["finetune"] = "lora"
    assert validate(parse_spec(raw)).model.quantisation == "4bit"
    config = quantisation_config("4bit", torch.bfloat16)
    assert (config.load_in_4bit, config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant,
            config.bnb_4bit_compute_dtype) == (True, "nf4", True, torch.bfloat16)
    assert quantisation_config("8bit", torch.float32).load_in_8bit


def test_tiny_preset_saves_a_loadable_checkpoint(tiny_dir):
    model = Blip2ForConditionalGeneration.from_pretrained(tiny_dir)
    head = model.language_model.get_output_embeddings().weight
    assert head is not model.language_model.get_input_embeddings().weight
    assert 0.25 < float(head.detach().std()) < 0.35  # the widened head survived save/load
    assert model.config.image_token_index == len(model.get_input_embeddings().weight) - 1  # the added <image>


def test_adapter_and_merged_exports_reload_to_the_same_outputs(tiny_dir, records, tmp_path):
    recipe = Blip2Recipe(parse_spec(job(tiny_dir, tmp_path)))
    model = recipe.load_for_training(tiny_dir)
    batch = tensors(recipe, tiny_dir, records[:3])
    train_steps(recipe, model, batch)
    folder = tmp_path / "adapter"
    recipe.save(model, tiny_dir, folder)

    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_dir
    assert all(".lora_" in key for key in load_file(folder / "adapter_model.safetensors"))
    inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    with torch.no_grad():
        expected = model.eval()(**inputs).logits
        reloaded = PeftModel.from_pretrained(Blip2ForConditionalGeneration.from_pretrained(tiny_dir), folder).eval()
        torch.testing.assert_close(reloaded(**inputs).logits, expected)
        merged_dir = export_merged(folder, tmp_path / "merged")
        merged = Blip2ForConditionalGeneration.from_pretrained(merged_dir).eval()
        assert not any("lora" in name for name, _ in merged.named_parameters())
        torch.testing.assert_close(merged(**inputs).logits, expected, atol=1e-4, rtol=1e-4)

    # The recipe's own loaders: resuming copies the adapter into a fresh one; inference decodes text.
    fresh = recipe.load_for_training(tiny_dir)
    recipe.restore(fresh, folder)
    for (name, a), (_, b) in zip(fresh.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), name
    inference = recipe.load_for_inference(str(folder))
    with torch.inference_mode():
        scored = recipe.generate_scored(inference, batch, GenerationSettings.from_eval(recipe.spec.eval))
    texts = scored.texts
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert all(0.0 < p < 1.0 for p in scored.mean_token_probs)  # scored on the OPT decoder under the adapter
    # Training can also continue from the adapter folder (a later stage's start_from).
    continued = recipe.load_for_training(str(folder))
    assert sum(p.numel() for p in continued.parameters() if p.requires_grad) == 2 * 2 * R * (64 + 64)


def val_loss_in_process(recipe, spec, model_dir: str) -> float:
    """Mean loss of a saved model (or an untrained base) over the validation shards, without Ray."""
    import pyarrow.parquet as pq

    from medvl.data.shards import read_manifest, shard_paths

    model, preprocess = recipe.load_for_inference(model_dir).module, recipe.preprocessor(model_dir)
    total, count = 0.0, 0
    for path in shard_paths(read_manifest(spec.shards_location), spec.shards_location, "val"):
        rows = pq.read_table(path).to_pydict()
        batch = preprocess({key: np.asarray(values, dtype=object) for key, values in rows.items()})
        with torch.no_grad():
            loss, _ = recipe.loss(model, {k: torch.as_tensor(batch[k]) for k in recipe.tensor_columns})
        total, count = total + loss.item() * len(rows["id"]), count + len(rows["id"])
    return total / count


@pytest.mark.slow
def test_end_to_end_on_ray_lowers_the_loss_and_writes_metrics(tmp_path, ray_local):
    from medvl.stages import run_stages

    spec = parse_spec({
        "name": "blip2_e2e",
        "output_dir": str(tmp_path / "run"),
        "stages": ["prepare", "train", "eval"],
        "data": {"format": "synthetic", "synthetic_images": 160, "synthetic_image_size": 48, "image_size": IMAGE_SIZE,
                 "max_text_length": 40, "records_per_shard": 80, "shuffle_buffer": 0},
        "model": {"recipe": "blip2", "preset": "tiny"},
        "train": {"finetune": "lora", "epochs": 3, "batch_size": 16, "lr": 1e-2, "workers": 1, "cpus_per_worker": 0.5,
                  "early_stopping_patience": 0},
        "eval": {"num_beams": 1, "max_new_tokens": 8, "max_samples": 8, "semantic": False},  # BERTScore: own tests
    })
    run_stages(spec)
    out = Path(spec.output_dir)
    summary = json.loads((out / "train" / "train_summary.json").read_text())
    history = summary["history"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    recipe = Blip2Recipe(spec)
    untrained = val_loss_in_process(recipe, spec, summary["model_source"])  # the tiny base, no adapter
    trained = val_loss_in_process(recipe, spec, summary["model_dir"])
    assert trained < untrained - 0.5, (untrained, trained)
    assert (Path(summary["model_dir"]) / "adapter_model.safetensors").is_file()
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 8


def test_a_prompt_is_read_after_the_image_tokens_and_only_the_answer_is_returned(tiny_dir, records, tmp_path):
    """The zero_shot baseline: BLIP-2 continues ``[image]×Q [bos] prompt`` (what its zero-shot use looks like)."""
    from medvl.models.base import GenerationSettings
    from medvl.models.blip2 import prompt_ids

    recipe = Blip2Recipe(parse_spec(job(tiny_dir, tmp_path)))
    loaded = recipe.load_for_inference(tiny_dir)
    batch = tensors(recipe, tiny_dir, records[:3])
    seen = []
    generate = loaded.module.generate

    def spy(**kwargs):
        seen.append(kwargs.get("input_ids"))
        return generate(**kwargs)

    loaded.module.generate = spy
    prompt = "findings:"
    settings = GenerationSettings(num_beams=1, max_new_tokens=5)
    plain = recipe.generate_scored(loaded, batch, settings)
    prompted = recipe.generate_scored(loaded, batch, GenerationSettings(1, 5, prompt=prompt))
    config = loaded.module.config
    expected = [config.image_token_index] * config.num_query_tokens + [config.text_config.bos_token_id] + \
        loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert seen[0] is None  # no prompt: generate starts from its own [image]×Q [bos]
    assert seen[1].tolist() == [expected] * 3 == prompt_ids(config, loaded.tokenizer, prompt).tolist() * 3
    assert len(prompted.texts) == 3 and all(0 < p <= 1 for p in prompted.mean_token_probs)
    assert all(not text.startswith(prompt) for text in prompted.texts)  # the prompt is not echoed back
    assert prompted.mean_token_probs != plain.mean_token_probs  # the prompt changed what the model read
