"""Expected calibration error against hand-computed values, for VQA answers and for report findings."""
from __future__ import annotations

import pytest

from medvl.eval.calibration import expected_calibration_error, finding_calibration, vqa_calibration
from medvl.models.registry import RECIPES

pytestmark = pytest.mark.usefixtures("one_thread")  # two torch threads on a shared 2-core machine spin


def test_ece_hand_computed_over_two_bins():
    # bin [0.2, 0.3): confidences 0.2, 0.2, one right → |0.5 − 0.2| = 0.3, weight 2/5
    # bin [0.9, 1.0]: 0.9, 0.9, 1.0, all right → |1 − 0.9333…| = 0.0667, weight 3/5
    ece = expected_calibration_error([0.2, 0.2, 0.9, 0.9, 1.0], [True, False, True, True, True], bins=10)
    assert ece == pytest.approx(2 / 5 * 0.3 + 3 / 5 * (1 - 2.8 / 3))


def test_ece_zero_when_confidence_matches_accuracy_and_large_when_overconfident():
    assert expected_calibration_error([0.75] * 4, [True, True, True, False]) == pytest.approx(0.0)
    assert expected_calibration_error([0.9] * 4, [True, False, True, False]) == pytest.approx(0.4)
    assert expected_calibration_error([], []) == 0.0
    with pytest.raises(ValueError):
        expected_calibration_error([0.5], [True, False])


def test_vqa_calibration_pairs_confidence_with_exact_match():
    scores = vqa_calibration([True, False], [0.8, 0.6])  # one bin each: |1 − 0.8| and |0 − 0.6|
    assert scores["vqa_ece"] == pytest.approx((0.2 + 0.6) / 2)
    assert scores["vqa_mean_confidence"] == pytest.approx(0.7)


def test_finding_calibration_scores_each_asserted_finding_with_its_report_confidence():
    refs = [{"Edema": 1.0, "Cardiomegaly": None}, {"Edema": 0.0, "Pleural Effusion": -1.0}]
    gens = [{"Edema": 1.0, "Cardiomegaly": 1.0, "No Finding": 1.0}, {"Pleural Effusion": 1.0, "Edema": 0.0}]
    # report 0 (0.9): Edema right, Cardiomegaly wrong (No Finding is not a finding);
    # report 1 (0.5): Pleural Effusion right (uncertain counts as positive); Edema negative, not asserted.
    scores = finding_calibration(refs, gens, [0.9, 0.5])
    assert scores["ce_findings_scored"] == 3
    assert scores["ce_finding_ece"] == pytest.approx(2 / 3 * abs(0.5 - 0.9) + 1 / 3 * abs(1.0 - 0.5))


def test_token_ece_and_nll_before_and_after_a_temperature_hand_computed():
    import math

    import torch

    from medvl.eval.calibration import token_calibration

    # token 1: probabilities (0.75, 0.25), reference 0 → right at 0.75; token 2: (0.1, 0.9), reference 0 → wrong
    # at 0.9. At T = 2 they become (√3/(√3+1), …) and (…, 0.75).
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(9.0)]])
    targets = torch.tensor([0, 0])
    scores = token_calibration([(logits, targets)], temperature=2.0)
    assert scores["token_ece_before"] == pytest.approx(((1 - 0.75) + 0.9) / 2)
    assert scores["token_ece_after"] == pytest.approx(((1 - 3 ** 0.5 / (3 ** 0.5 + 1)) + 0.75) / 2)
    assert scores["token_nll_before"] == pytest.approx(-(math.log(0.75) + math.log(0.1)) / 2)
    assert scores["token_nll_after"] == pytest.approx(-(math.log(3 ** 0.5 / (3 ** 0.5 + 1)) + math.log(0.25)) / 2)
    assert scores["calibration_tokens"] == 2 and scores["temperature"] == 2.0


def test_fitted_temperature_undoes_overconfidence_and_lowers_token_ece():
    import torch

    from medvl.eval.calibration import fit_temperature, token_calibration

    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 12, generator=generator) * 1.5
    targets = torch.multinomial(torch.softmax(true_logits, -1), 1, generator=generator)[:, 0]
    overconfident = true_logits * 3.0  # the model's logits: 3× too sharp, so T ≈ 3 calibrates it
    batches = [(overconfident[i:i + 500], targets[i:i + 500]) for i in range(0, 4000, 500)]
    temperature, fitted = fit_temperature(batches)
    assert temperature == pytest.approx(3.0, rel=0.1)
    assert fitted.mean_nll(temperature) < fitted.mean_nll(1.0)
    scores = token_calibration(batches, temperature)
    assert scores["token_ece_after"] < 0.5 * scores["token_ece_before"]


def label_smoothing(model) -> float:
    """The label smoothing of a model's LM loss: BLIP's text decoder reads it from its config; causal LMs have none."""
    smoothing = {getattr(m.config, "text_config", m.config).to_dict().get("label_smoothing", 0.0)
                 for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "to_dict")}
    assert len(smoothing) <= 1, smoothing
    return smoothing.pop() if smoothing else 0.0


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_gives_the_logits_of_exactly_the_tokens_its_loss_scores(name, tmp_path):
    """eval.calibrate fits T on target_logits: every registered recipe must expose them (a recipe without them
    could not be calibrated), and they must be the loss's own positions and targets."""
    import torch
    import torch.nn.functional as F

    from medvl.models.base import Recipe
    from medvl.models.registry import build_recipe
    from medvl.spec import parse_spec
    from tests.test_recipe_contract import ANSWERS, QUESTIONS, REPORTS, shard_rows, tiny_job

    torch.manual_seed(0)
    recipe = build_recipe(parse_spec(tiny_job(name, tmp_path / "run")))
    assert type(recipe).target_logits is not Recipe.target_logits
    source = recipe.initial_model(tmp_path / "start", lambda: iter((REPORTS + QUESTIONS + ANSWERS) * 5))
    batch = recipe.preprocessor(source)(shard_rows())
    tensors = {column: torch.as_tensor(batch[column]) for column in recipe.tensor_columns}
    model = recipe.load_for_inference(source).module
    with torch.no_grad():
        logits, targets = recipe.target_logits(model, tensors)
        loss, scalars = recipe.loss(model, tensors)
    if name == "blip_dapt":  # its loss sums ITC, ITM and the captioning LM; the LM term is the comparable one
        loss = torch.as_tensor(scalars["loss_lm"])
    assert logits.ndim == 2 and logits.shape[0] == targets.shape[0] > 4
    assert F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing(model)).item() == \
        pytest.approx(loss.item(), rel=1e-4)


def test_token_tables_of_batches_add_up_to_the_table_of_their_union_and_give_the_per_token_ece():
    import torch

    from medvl.eval.calibration import TokenStats, temperature_grid

    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(300, 20, generator=generator) * 2.0
    targets = torch.randint(0, 20, (300,), generator=generator)
    grid = temperature_grid()
    whole = TokenStats.of(logits, targets, grid)
    parts = TokenStats.empty(grid)
    for start in range(0, 300, 70):  # uneven batches, shipped flat as an actor would return them
        batch = TokenStats.of(logits[start:start + 70], targets[start:start + 70], grid)
        parts += TokenStats.from_flat(grid, batch.flat)
    assert parts.tokens == whole.tokens == 300
    assert parts.table == pytest.approx(whole.table, rel=1e-9)
    for temperature in (grid[0], 1.0, grid[-1]):
        probs = torch.softmax(logits / temperature, -1)
        confidences, correct = probs.max(-1).values.tolist(), (probs.argmax(-1) == targets).tolist()
        assert parts.ece(temperature) == pytest.approx(expected_calibration_error(confidences, correct), abs=1e-9)
        nll = torch.nn.functional.cross_entropy(logits / temperature, targets).item()
        assert parts.mean_nll(temperature) == pytest.approx(nll, rel=1e-5)
    with pytest.raises(ValueError):
        parts + TokenStats.empty((1.0,))
