"""Rerunning a train stage: a finished run starts afresh, a crashed one resumes only with the same settings."""
from __future__ import annotations

from pathlib import Path

import pytest

from medvl.spec import parse_spec
from medvl.runs import SUMMARY_FILE as SUMMARY
from medvl.train.trainer import claim_run_folder, storage_location


def spec_with(tmp_path: Path, lr: float):
    return parse_spec({"name": "t", "output_dir": str(tmp_path / "run"), "stages": ["train"], "train": {"lr": lr}})


def crashed_run(tmp_path: Path, lr: float) -> tuple[Path, Path]:
    """A stage that started (claimed its folder), left a checkpoint, and never wrote its summary."""
    spec = spec_with(tmp_path, lr)
    out = tmp_path / "run" / "train"
    out.mkdir(parents=True)
    claim_run_folder(spec, "train")
    run_dir = Path(storage_location(spec)) / "train"
    (run_dir / "checkpoint_1").mkdir(parents=True)
    return out, run_dir


def test_a_crashed_run_is_kept_for_resuming_with_the_same_settings(tmp_path: Path):
    out, run_dir = crashed_run(tmp_path, 1e-3)
    claim_run_folder(spec_with(tmp_path, 1e-3), "train")
    assert (run_dir / "checkpoint_1").is_dir()


def test_a_crashed_run_with_other_settings_is_refused(tmp_path: Path):
    out, run_dir = crashed_run(tmp_path, 1e-3)
    with pytest.raises(ValueError, match="unfinished run of stage 'train' with other settings"):
        claim_run_folder(spec_with(tmp_path, 2e-3), "train")
    assert (run_dir / "checkpoint_1").is_dir()


def test_a_finished_run_is_cleared_and_its_summary_removed_until_the_new_one_ends(tmp_path: Path):
    out, run_dir = crashed_run(tmp_path, 1e-3)
    (out / SUMMARY).write_text("{}")  # the run finished
    claim_run_folder(spec_with(tmp_path, 2e-3), "train")
    assert not run_dir.exists() and not (out / SUMMARY).exists()
