"""Serve-time sampling (medvl.models.scored_generation), free of models and Ray: a seeded TemperatureSampling draws
the same tokens again and different seeds draw differently, without touching torch's global generator."""
from __future__ import annotations

import pytest
import torch

from medvl.models.scored_generation import TemperatureSampling

ROWS, VOCAB, STEPS = 4, 50, 12


def draws(sampling: TemperatureSampling, scores: torch.Tensor) -> list[list[int]]:
    """Each row's token at each of STEPS steps (the same scores every step: only the dice change)."""
    picked = [sampling(torch.zeros((scores.shape[0], 1), dtype=torch.long), scores).argmax(-1) for _ in range(STEPS)]
    return torch.stack(picked, 1).tolist()


def test_a_seeded_row_draws_the_same_tokens_again_and_another_seed_draws_others():
    scores = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(0)).repeat(ROWS, 1)  # one model, 4 rows
    seeds = [1, 2, 1, 2**70]  # any integer
    first = draws(TemperatureSampling(2.0, seeds), scores)
    assert first[0] == first[2] and len({tuple(row) for row in first}) == 3, first  # the seed decides the dice
    torch.manual_seed(123)
    state = torch.get_rng_state()
    again = draws(TemperatureSampling(2.0, seeds), scores)
    assert torch.equal(torch.get_rng_state(), state)  # seeded rows leave the global generator alone
    assert again == first
    other = draws(TemperatureSampling(2.0, [4, 5, 6, 7]), scores)
    assert all(a != b for a, b in zip(first, other)), (first, other)


def test_a_seeded_rows_draws_do_not_depend_on_its_neighbours_in_the_batch():
    scores = torch.randn(ROWS, VOCAB, generator=torch.Generator().manual_seed(1))
    alone = draws(TemperatureSampling(2.0, [9]), scores[2:3])
    mixed = draws(TemperatureSampling(2.0, [None, 5, 9, None]), scores)
    assert mixed[2] == alone[0]
    torch.manual_seed(7)
    unseeded = draws(TemperatureSampling(2.0), scores)
    torch.manual_seed(7)
    assert draws(TemperatureSampling(2.0, [None] * ROWS), scores) == unseeded  # no seed: the global dice, as before
    with pytest.raises(ValueError, match="2 sampling seeds for a generation of 4 rows"):
        TemperatureSampling(2.0, [1, 2])(torch.zeros((ROWS, 1), dtype=torch.long), scores)
