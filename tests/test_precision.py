"""model.dtype and train.precision: what the spec accepts, frozen weights staying in bf16 while adapters train in
fp32 (loss falls), fp16 without DeepSpeed going through a GradScaler, low-precision eval/serve loading."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medvl.models.base import GenerationSettings
from medvl.data.synthetic import synthetic_records
from medvl.models.precision import dtype_census, training_precision, weight_dtype
from medvl.models.registry import build_recipe
from medvl.spec import SpecError, parse_spec
from tests.batches import shard_batch

SIZE = 32

pytestmark = pytest.mark.usefixtures("one_thread")


def job(recipe: str = "blip2", finetune: str = "lora", **sections) -> dict:
    raw = {
        "name": "precision", "output_dir": "/tmp/unused", "stages": ["train"],
        "data": {"image_size": SIZE, "max_text_length": 40},
        "model": {"recipe": recipe, "preset": "tiny", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "train": {"finetune": finetune, "lr": 1e-2, "weight_decay": 0.0, "warmup_ratio": 0.0},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


@pytest.fixture(scope="module")
def records():
    return list(synthetic_records(8, image_size=48))


@pytest.fixture
def ddp_engine(monkeypatch, records, tmp_path):
    """A DdpEngine for a spec, outside Ray Train (prepare_model would wrap for DDP there), with a batch."""
    import ray.train.torch

    from medvl.train.engines import DdpEngine

    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda model: model)

    def make(raw: dict, total_steps: int = 10):
        spec = parse_spec(raw)
        recipe = build_recipe(spec)
        source = recipe.initial_model(tmp_path, lambda: iter([r.text for r in records]))
        batch = recipe.preprocessor(source)(shard_batch(records))
        return DdpEngine(spec, recipe, source, total_steps), {k: torch.as_tensor(batch[k]) for k in recipe.tensor_columns}

    return make


def train(engine, batch, steps: int) -> list[float]:
    losses = []
    engine.model.train()
    for _ in range(steps):
        with engine.autocast():
            loss, _ = engine.recipe.loss(engine.model, engine.prepare_batch(batch))
        engine.backward_and_step(loss, boundary=True)
        losses.append(loss.item())
    return losses


# ------------------------------------------------------------------------------------------------ the spec


def test_low_precision_weights_refuse_a_contradicting_precision():
    with pytest.raises(SpecError, match='train.precision: expected auto or bf16 with model.dtype bfloat16 '
                                        r'\(the weights compute in it\), got "fp32"'):
        parse_spec(job(model={"dtype": "bfloat16"}, train={"precision": "fp32"}))
    with pytest.raises(SpecError, match="model.dtype: expected one of 'auto', 'bfloat16', 'float16', 'float32', "
                                        'got "bf16"'):
        parse_spec(job(model={"dtype": "bf16"}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="what auto means on a machine without a GPU")
def test_auto_is_fp32_on_cpu_and_a_low_precision_dtype_sets_the_precision():
    auto = parse_spec(job())
    assert weight_dtype(auto) == torch.float32 and training_precision(auto) == "fp32"
    bf16 = parse_spec(job(model={"dtype": "bfloat16"}))
    assert weight_dtype(bf16) == torch.bfloat16 and training_precision(bf16) == "bf16"


def test_deepspeed_follows_the_weights_precision():
    from medvl.train.deepspeed_config import deepspeed_config

    config = deepspeed_config(parse_spec(job(model={"dtype": "bfloat16"}, train={"strategy": "deepspeed"})), 2)
    assert config["bf16"] == {"enabled": True}


# ------------------------------------------------------------------------------------------------ training


def test_bf16_loaded_blip2_lora_keeps_frozen_weights_bf16_trains_fp32_adapters_and_learns(ddp_engine):
    engine, batch = ddp_engine(job(model={"dtype": "bfloat16"}, train={"lr": 3e-2}))
    census = dtype_census(engine.unwrapped)
    assert set(census) == {(False, torch.bfloat16), (True, torch.float32)}, census  # frozen bf16, adapters fp32
    assert census[(False, torch.bfloat16)] > 100 * census[(True, torch.float32)]
    assert engine.scaler is None  # bf16 has fp32's range: nothing to scale

    losses = train(engine, batch, steps=10)
    assert losses[-1] < losses[0] - 1.0, losses
    states = [engine.optimizer.state[p] for p in engine.trainable]
    assert all(s["exp_avg"].dtype == torch.float32 for s in states)
    assert set(dtype_census(engine.unwrapped)) == set(census)  # training moved no weight to another dtype

    fp32, _ = ddp_engine(job(model={"dtype": "float32"}, train={"lr": 3e-2}))
    assert train(fp32, batch, steps=10)[-1] == pytest.approx(losses[-1], rel=0.02)  # bf16 learns as fp32 does


def test_bf16_weights_under_a_full_fine_tune_train_in_fp32_beside_a_frozen_bf16_vit(ddp_engine):
    engine, batch = ddp_engine(job(finetune="frozen_vision", model={"dtype": "bfloat16"}, train={"lr": 1e-3}))
    for name, parameter in engine.unwrapped.named_parameters():
        frozen = name.startswith("vision_model.")
        assert parameter.dtype == (torch.bfloat16 if frozen else torch.float32), name
    losses = train(engine, batch, steps=4)  # autocast bridges the bf16 ViT and the fp32 rest
    assert losses[-1] < losses[0], losses


def test_fp16_without_deepspeed_scales_the_loss_and_skips_a_step_whose_gradients_overflow(ddp_engine):
    engine, batch = ddp_engine(job(model={"dtype": "float16"}))
    assert isinstance(engine.scaler, torch.amp.GradScaler) and engine.scaler.get_scale() == 2.0 ** 16
    for name, parameter in engine.unwrapped.named_parameters():
        kept_in_fp32 = ".qformer." in name or "query_tokens" in name  # HF's _keep_in_fp32_modules for BLIP-2 in fp16
        expected = torch.float32 if parameter.requires_grad or kept_in_fp32 else torch.float16
        assert parameter.dtype == expected, name

    train(engine, batch, steps=2)  # lora_B starts at 0: the first step moves B, the second A
    before = {id(p): p.detach().clone() for p in engine.trainable}
    train(engine, batch, steps=1)
    assert all(not torch.equal(before[id(p)], p) for p in engine.trainable)  # a finite step: every weight moved

    before = {id(p): p.detach().clone() for p in engine.trainable}
    with engine.autocast():
        loss, _ = engine.recipe.loss(engine.model, batch)
    engine.backward_and_step(loss * float("inf"), boundary=True)  # overflowing gradients
    assert all(torch.equal(before[id(p)], p) for p in engine.trainable)  # the scaler skipped the step…
    assert engine.scaler.get_scale() == 2.0 ** 15  # …and halved the scale


def test_the_scaler_state_is_saved_with_the_optimizer(ddp_engine, tmp_path):
    engine, batch = ddp_engine(job(model={"dtype": "float16"}))
    train(engine, batch, steps=1)
    saved = engine.save(tmp_path / "checkpoint", rank=0)
    assert saved["scaler"]["scale"] == engine.scaler.get_scale()


# ------------------------------------------------------------------------------------------------ eval / serve


@pytest.mark.parametrize("recipe_name, finetune", [("blip2", "lora"), ("softprompt_llm", "frozen_vision")])
def test_inference_loads_in_the_weights_dtype_and_takes_fp32_pixels(records, tmp_path, recipe_name, finetune):
    spec = parse_spec(job(recipe_name, finetune, model={"dtype": "bfloat16", "num_prefix_tokens": 4},
                          eval={"num_beams": 1, "max_new_tokens": 4}))
    recipe = build_recipe(spec)
    source = recipe.initial_model(tmp_path, lambda: iter([r.text for r in records]))
    loaded = recipe.load_for_inference(source)
    assert {p.dtype for name, p in loaded.module.named_parameters() if ".lora_" not in name} == {torch.bfloat16}
    batch = recipe.preprocessor(source)(shard_batch(records[:2]))
    tensors = {k: torch.as_tensor(batch[k]) for k in recipe.tensor_columns}
    assert tensors["pixel_values"].dtype == torch.float32  # as the preprocessor and the server hand them over
    with torch.inference_mode():
        scored = recipe.generate_scored(loaded, tensors, GenerationSettings.from_eval(spec.eval))
    assert len(scored.texts) == 2 and all(0.0 < p <= 1.0 for p in scored.mean_token_probs)


# ------------------------------------------------------------------------------------------------ preset: random


def test_random_blip2_is_the_published_architecture_with_ids_from_the_trained_tokenizer():
    from transformers import Blip2ForConditionalGeneration

    from medvl.models.architectures import build_on_meta
    from medvl.models.blip2 import IMAGE_TOKEN, random_blip2_config
    from medvl.models.random_preset import random_tokenizer

    tokenizer = random_tokenizer(["the heart is normal in size", "no pleural effusion"])
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    config = random_blip2_config("Salesforce/blip2-opt-2.7b", tokenizer, image_size=224)
    assert config.image_token_index == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) < config.text_config.vocab_size
    assert config.text_config.eos_token_id == tokenizer.eos_token_id
    model = build_on_meta(config, Blip2ForConditionalGeneration)
    assert sum(p.numel() for p in model.parameters()) == 3_744_761_856  # the 2024 hub revision's count


def test_random_softprompt_writes_gpt2_and_resnet50_once_in_bf16_and_trains_the_whole_lm(records, tmp_path):
    spec = parse_spec(job("softprompt_llm", "frozen_vision",
                          model={"preset": "random", "name_or_path": "gpt2", "dtype": "bfloat16", "lm_lora": False}))
    recipe = build_recipe(spec)
    source = Path(recipe.initial_model(tmp_path, lambda: iter([r.text for r in records])))
    assert (source / "lm" / "model.safetensors").is_file() and not (source / "base_lm").exists()  # no second copy
    model = recipe.load_for_training(str(source))
    assert sum(p.numel() for p in model.lm.parameters()) == 124_439_808  # GPT-2 small, embeddings tied
    assert sum(p.numel() for p in model.vision.parameters()) == 23_508_032  # ResNet-50 without its head
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(p.requires_grad for p in model.lm.parameters()) and not any(
        p.requires_grad for p in model.vision.parameters())
