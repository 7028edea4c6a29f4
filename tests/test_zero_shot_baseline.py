"""The prompted zero-shot baseline (eval.baselines: [zero_shot] with eval.prompt): the untrained model generates
after the prompt, the trained one without; the spec refuses a zero_shot without a prompt, a prompt without it,
and a recipe that cannot be prompted."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from medvl.eval import evaluate
from medvl.eval.evaluate import Predictions
from medvl.spec import SpecError, StageSpec, parse_spec
from medvl.validation import validate

PROMPT = "Describe the findings in this chest X-ray:"


def spec_for(tmp_path: Path, recipe: str = "blip2", **eval_settings):
    return parse_spec({"name": "zs", "output_dir": str(tmp_path), "stages": ["train", "eval"],
                       "model": {"recipe": recipe, "preset": "tiny"},
                       "train": {"finetune": "lora" if recipe == "blip2" else "full"},
                       "eval": {"semantic": False, "clinical": False, **eval_settings}})


def test_the_untrained_model_is_prompted_and_the_trained_one_is_not(tmp_path, monkeypatch):
    calls = []

    def fake_generate(spec, models, label="eval", prompts=None, temperatures=None):
        calls.extend((model_dir, (prompts or {}).get(name, "")) for name, model_dir in models.items())
        return {name: Predictions(["a"], ["no effusion."], [f"{model_dir} {(prompts or {}).get(name, '')}".strip()],
                                  [""], [0.5]) for name, model_dir in models.items()}

    monkeypatch.setattr(evaluate, "generate_predictions", fake_generate)
    monkeypatch.setattr(evaluate, "score", lambda spec, recipe, preds, java=True: {"prediction": preds.predictions[0]})
    monkeypatch.setattr(evaluate, "java_reason", lambda spec, recipe: None)
    monkeypatch.setattr(evaluate, "write_report", lambda *args: None)
    spec = validate(spec_for(tmp_path, baselines=["untrained", "zero_shot"], prompt=PROMPT, calibrate=False))
    evaluate.run_eval_stage(spec, StageSpec(kind="eval", name="eval"), "trained_dir", untrained_dir="base_dir")
    assert calls == [("trained_dir", ""), ("base_dir", ""), ("base_dir", PROMPT)]
    comparison = json.loads((tmp_path / "zs.json").read_text())
    assert comparison["zero_shot"] == {"prediction": f"base_dir {PROMPT}"}
    assert comparison["untrained"] == {"prediction": "base_dir"}


@pytest.mark.parametrize("recipe, eval_settings, message", [
    ("blip2", {"baselines": ["zero_shot"]}, "eval.prompt: expected the zero_shot baseline's prompt"),
    ("blip2", {"baselines": ["zero_shot"], "prompt": "  "}, "eval.prompt: expected the zero_shot baseline's prompt"),
    ("blip2", {"prompt": PROMPT}, "eval.prompt: expected it unset unless eval.baselines has zero_shot"),
    ("blip2", {"baselines": ["zero-shot"], "prompt": PROMPT}, "eval.baselines[0]: expected one of"),
    ("blip_caption", {"baselines": ["zero_shot"], "prompt": PROMPT},
     "eval.baselines: zero_shot needs a recipe that generates after a prompt (blip2), got recipe blip_caption"),
])
def test_zero_shot_settings_are_refused_naming_the_field(tmp_path, recipe, eval_settings, message):
    with pytest.raises(SpecError) as info:
        validate(spec_for(tmp_path, recipe, **eval_settings))
    assert str(info.value).startswith(message), str(info.value)
