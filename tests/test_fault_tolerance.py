"""A Train worker killed mid-epoch (SIGKILL, from outside) while it uploads a checkpoint costs a restart from the
previous checkpoint, not a sample or a step; the half-written checkpoint is never resumed from."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from medvl.spec import parse_spec
from medvl.train.loop import TRAINING_STATE
from medvl.train.trainer import planned_steps, storage_location

pytestmark = pytest.mark.slow

EVAL_EVERY = 4


def job(tmp_path: Path) -> dict:
    return {
        "name": "killed",
        "output_dir": str(tmp_path / "run"),
        "stages": ["prepare", "train"],
        "data": {"format": "synthetic", "synthetic_images": 300, "synthetic_image_size": 32, "image_size": 32,
                 "max_text_length": 40, "records_per_shard": 64, "shuffle_buffer": 0},
        "model": {"recipe": "blip_caption", "preset": "tiny"},
        "train": {"epochs": 2, "batch_size": 8, "lr": 2e-3, "workers": 2, "cpus_per_worker": 0.5,
                  "early_stopping_patience": 0, "eval_every_steps": EVAL_EVERY, "max_val_batches": 1,
                  "max_failures": 1, "num_checkpoints_to_keep": 3},
    }


def test_killed_mid_save_resumes_from_the_last_complete_checkpoint(tmp_path: Path, ray_local, monkeypatch):
    import dataclasses

    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from medvl.stages import run_stages
    from medvl.train import trainer
    from tests.trapped_storage import (
        TrappedLocalFileSystem,  # importable by the Ray workers too
    )

    trap_dir = tmp_path / "trap"
    trap_dir.mkdir()
    storage = PyFileSystem(FSSpecHandler(TrappedLocalFileSystem(str(trap_dir))))
    original = trainer.run_config
    monkeypatch.setattr(trainer, "run_config", lambda *a, **k: dataclasses.replace(
        original(*a, **k), storage_filesystem=storage))

    spec = parse_spec(job(tmp_path))
    run_stages(spec, kinds=("prepare",))
    run_dir = Path(storage_location(spec)) / "train"
    interrupted: list[str] = []

    def interrupt_the_second_save() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not list(run_dir.glob("checkpoint_*/training_state.pt")):
            time.sleep(0.05)
        (trap_dir / "armed").touch()  # the first checkpoint is complete: trap the next upload
        while time.monotonic() < deadline and not (trap_dir / "saving").exists():
            time.sleep(0.05)
        pid, path = (trap_dir / "saving").read_text().split(" ", 1)
        os.kill(int(pid), signal.SIGKILL)
        interrupted.append(path)

    watcher = threading.Thread(target=interrupt_the_second_save, daemon=True)
    watcher.start()
    run_stages(spec, kinds=("train",))
    watcher.join(timeout=1)

    summary = json.loads((Path(spec.output_dir) / "train" / "train_summary.json").read_text())
    assert interrupted, "no save was interrupted"
    half_written = Path(interrupted[0]).parent
    assert half_written.is_dir() and not (half_written / TRAINING_STATE).exists()
    # The run went on from the first checkpoint (step EVAL_EVERY), not from the half-written second one.
    assert summary["resumed_at_steps"] == [EVAL_EVERY]
    train_rows = json.loads((Path(spec.output_dir) / "shards" / "manifest.json").read_text())["counts"]["train"]
    assert train_rows % 2 == 0  # Ray's equal split over 2 workers then drops no row, so counts compare exactly
    assert summary["steps"] == planned_steps(train_rows, spec)  # as many optimizer steps as an uninterrupted run
    # Every epoch trained each training row exactly once, including the one the kill interrupted.
    assert summary["epochs"] == [
        {"epoch": epoch, "samples": train_rows, "distinct_samples": train_rows} for epoch in range(2)
    ]


class KillTrialAt:
    """A Tune callback that SIGKILLs a trial's process (its ``pid``, from its results) once Tune has registered the
    checkpoint it reported at ``step`` (``on_trial_save``: Tune saves a function trainable's checkpoint after the
    result that carried it)."""

    def __new__(cls, step: int):
        from ray.tune import Callback

        class _Kill(Callback):
            def __init__(self):
                self.killed: list[int] = []

            def on_trial_save(self, iteration, trials, trial, **info):
                result = trial.last_result
                if result.get("step") == step and not self.killed:
                    self.killed.append(result["pid"])
                    os.kill(result["pid"], signal.SIGKILL)

        return _Kill()


def test_a_trial_training_in_its_own_process_restarts_from_its_last_checkpoint_after_a_kill(tmp_path: Path,
                                                                                           ray_local):
    import yaml

    from medvl.stages import run_stages
    from medvl.tune.stage import run_tune_stage

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"train.lr": {"grid": [2e-3]}}))
    raw = job(tmp_path) | {"stages": ["prepare", "tune"]}
    raw["train"] |= {"workers": 1, "cpus_per_worker": 0.5, "epochs": 1}
    raw["tune"] = {"space": str(space), "scheduler": "none", "max_steps": 3 * EVAL_EVERY,
                   "eval_every_steps": EVAL_EVERY, "max_concurrent_trials": 1}
    spec = parse_spec(raw)
    run_stages(spec, kinds=("prepare",))
    kill = KillTrialAt(EVAL_EVERY)
    summary = run_tune_stage(spec, spec.stages[1], callbacks=[kill])

    assert kill.killed and summary["complete"]
    tune_dir = Path(spec.output_dir) / "tune"
    starts = [json.loads(line) for line in (tune_dir / "trial_starts.jsonl").read_text().splitlines()]
    assert len(starts) == 2 and starts[0]["trial_id"] == starts[1]["trial_id"]  # the same trial, started again
    trial = json.loads((tune_dir / "trials" / starts[0]["trial_id"] / "train" / "train_summary.json").read_text())
    # It went on from the checkpoint of the kill's step, not from the start, and ran to its planned end.
    assert trial["resumed_at_steps"] == [EVAL_EVERY]
    assert trial["steps"] == 3 * EVAL_EVERY
    assert (tune_dir / "best" / "model" / "config.json").is_file()
