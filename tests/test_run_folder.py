"""Rerunning a train stage: a finished run starts afresh, a crashed one resumes only with the same settings."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from medvl.data.shards import write_shards
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
    assert not (run_dir / "checkpoint_1").exists() and not (out / SUMMARY).exists()
    assert json.loads((run_dir / "run_spec.json").read_text())["spec"]["train"]["lr"] == 2e-3  # the new run's


def test_a_run_folder_without_checkpoints_starts_afresh_whatever_it_was(tmp_path: Path):
    out, run_dir = crashed_run(tmp_path, 1e-3)
    (run_dir / "checkpoint_1").rmdir()  # it failed before its first checkpoint
    claim_run_folder(spec_with(tmp_path, 2e-3), "train")
    assert json.loads((run_dir / "run_spec.json").read_text())["spec"]["train"]["lr"] == 2e-3


def test_checkpoints_without_a_record_of_their_run_are_not_resumed(tmp_path: Path):
    out, run_dir = crashed_run(tmp_path, 1e-3)
    (run_dir / "run_spec.json").unlink()
    with pytest.raises(ValueError, match=r"unfinished run of stage 'train' with no record of its settings and data"):
        claim_run_folder(spec_with(tmp_path, 1e-3), "train")
    assert (run_dir / "checkpoint_1").is_dir()


def test_a_resume_on_other_data_is_refused_naming_it(tmp_path: Path):
    spec = spec_with(tmp_path, 1e-3)
    shards = Path(spec.shards_location)
    write_shards([], str(shards), source="a", format="test")
    out, run_dir = crashed_run(tmp_path, 1e-3)
    write_shards([], str(shards), source="b", format="test")  # prepared again, from something else
    with pytest.raises(ValueError, match=r"unfinished run of stage 'train' on other data \(the manifest"):
        claim_run_folder(spec, "train")


def test_a_resume_with_other_deepspeed_file_contents_is_refused(tmp_path: Path):
    expert = tmp_path / "ds.json"
    expert.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}}))
    raw = {"name": "t", "output_dir": str(tmp_path / "run"), "stages": ["train"],
           "train": {"strategy": "deepspeed", "deepspeed": {"config_file": str(expert)}}}
    out = tmp_path / "run" / "train"
    out.mkdir(parents=True)
    claim_run_folder(parse_spec(raw), "train")
    run_dir = Path(storage_location(parse_spec(raw))) / "train"
    (run_dir / "checkpoint_1").mkdir()
    claim_run_folder(parse_spec(raw), "train")  # the same file: resumes
    expert.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 5000}}))  # same path, new contents
    with pytest.raises(ValueError, match=r"with another train.deepspeed.config_file \(its contents changed\)"):
        claim_run_folder(parse_spec(raw), "train")


def test_the_refusal_names_the_settings_that_changed(tmp_path: Path):
    out, _ = crashed_run(tmp_path, 1e-3)
    with pytest.raises(ValueError, match=r"with other settings \(train\.lr 0\.001 → 0\.002\)"):
        claim_run_folder(spec_with(tmp_path, 2e-3), "train")
