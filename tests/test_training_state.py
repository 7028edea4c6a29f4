"""The resume state (training_state.pt) loads with ``weights_only=True``: a checkpoint folder on shared storage
cannot make a worker run code, and the state medvl writes (optimizer, scheduler, RNG, counters) still loads."""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup

from medvl.train.loop import TRAINING_STATE, TrainState, _load_training_state, _save_checkpoint


class StubEngine:
    """The DDP engine's save/load contract, without Ray Train: a real AdamW and the loop's cosine schedule."""

    def __init__(self):
        self.model = torch.nn.Linear(4, 2)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.01)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, 2, 10)
        self.loaded = None

    def step(self):
        self.model(torch.randn(3, 4)).sum().backward()
        self.optimizer.step()
        self.scheduler.step()

    def save(self, folder: Path, rank: int) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load(self, folder: Path, saved: dict) -> None:
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.loaded = saved


def test_the_state_medvl_writes_loads_with_weights_only(tmp_path: Path):
    engine = StubEngine()
    for _ in range(3):
        engine.step()
    state = TrainState(epoch=1, step=3, best_val_loss=0.5, history=[{"step": 3, "val_loss": 0.5}],
                       epochs=[{"epoch": 0, "samples": 9, "distinct_samples": 9}], resumed_at_steps=[2])
    run = SimpleNamespace(engine=engine, epoch_trained=[11, 12, 13])
    assert _save_checkpoint(tmp_path, run, state, rank=0)

    fresh = StubEngine()
    loaded, trained = _load_training_state(tmp_path, fresh)
    assert loaded == state and trained == [11, 12, 13]
    assert fresh.scheduler.last_epoch == 3 and fresh.optimizer.state_dict()["state"][0]["step"] == 3
    torch.load(tmp_path / TRAINING_STATE, weights_only=True)  # the same check torch applies inside


class RunsCode:
    def __reduce__(self):
        return (os.mkdir, (str(Path(os.environ["MEDVL_TEST_MARKER"])),))


def test_a_pickle_that_runs_code_is_refused(tmp_path: Path, monkeypatch):
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("MEDVL_TEST_MARKER", str(marker))
    torch.save({"state": {}, "rng": torch.get_rng_state(), "payload": RunsCode()}, tmp_path / TRAINING_STATE)
    with pytest.raises(pickle.UnpicklingError):
        _load_training_state(tmp_path, StubEngine())
    assert not marker.exists()
