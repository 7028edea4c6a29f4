"""Locations on a local disk and on S3 (moto on loopback) behave alike; model folders on S3 load from a local
cache, fetched once, with references to other folders (a peft adapter's base) following them."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from medvl.models.cache import local_model, portable_references, publishing, remote_name
from medvl.runs import RunLayout, stage_model, write_summary
from medvl.spec import parse_spec
from medvl.storage import Location

BUCKET = "medvl-storage"


@pytest.fixture
def bucket(s3_endpoint):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    return s3_endpoint


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> Location:
    if request.param == "local":
        return Location.of(tmp_path / "root")
    endpoint = request.getfixturevalue("bucket")
    return Location.of(f"s3://{BUCKET}/root", endpoint)


def test_a_location_reads_writes_lists_and_deletes_the_same_everywhere(root: Location):
    stage = root / "train"
    stage.mkdir()
    assert not (stage / "summary.json").exists()
    (stage / "summary.json").write_text('{"a": 1}')
    (stage / "model" / "weights.bin").write_bytes(b"\x00\x01")
    assert json.loads((stage / "summary.json").read_text()) == {"a": 1}
    assert (stage / "summary.json").is_file() and (stage / "model").is_dir() and stage.is_dir()
    assert [entry.name for entry in stage.iterdir()] == ["model", "summary.json"]
    assert [entry.name for entry in stage.glob("*.json")] == ["summary.json"]
    assert stage.files() == ["model/weights.bin", "summary.json"]
    assert (stage / "model").relative_to(root) == "train/model" and (stage / "model").parent == stage
    (stage / "summary.json").unlink()
    (stage / "summary.json").unlink(missing_ok=True)
    stage.rmtree()
    assert not stage.exists() and root.iterdir() == []


def test_an_s3_location_is_named_by_its_url_and_is_no_local_path(bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    location = Location.of(f"s3://{BUCKET}/runs/job/", bucket)
    assert str(location / "train") == f"s3://{BUCKET}/runs/job/train" and not location.is_local
    with pytest.raises(TypeError, match="not on this machine"):
        open(location / "x.json", "w")
    (location / "x.json").write_text("{}")
    assert list(tmp_path.iterdir()) == []  # nothing named after the URL appeared here


def test_a_spec_takes_an_s3_output_dir_and_the_run_layout_lands_there(bucket):
    spec = parse_spec({"name": "t", "output_dir": f"s3://{BUCKET}/run", "stages": ["prepare", "train"],
                       "data": {"endpoint_url": bucket}})
    assert spec.shards_location == f"s3://{BUCKET}/run/shards"
    layout = RunLayout.for_spec(spec)
    assert str(layout.model("train")) == f"s3://{BUCKET}/run/train/model"
    write_summary(layout.stage("train"), {"model_dir": str(layout.model("train"))})
    assert stage_model(spec.output_dir, "train", bucket) == f"s3://{BUCKET}/run/train/model"


def write_model(folder: Path, base: str | None = None) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "blip"}')
    (folder / "model.safetensors").write_bytes(os.urandom(64))
    if base is not None:
        (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))


def test_a_model_on_s3_is_fetched_once_and_again_when_it_changes(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVL_CACHE_DIR", str(tmp_path / "cache"))
    write_model(tmp_path / "m")
    remote = Location.of(f"s3://{BUCKET}/run/train/model", bucket)
    remote.upload(tmp_path / "m")
    first = local_model(str(remote), bucket)
    assert Path(first).is_relative_to(tmp_path / "cache")
    assert (Path(first) / "model.safetensors").read_bytes() == (tmp_path / "m" / "model.safetensors").read_bytes()
    assert remote_name(first) == str(remote)  # the cache path says which URL it holds
    (Path(first) / "marker").write_text("kept")
    assert local_model(str(remote), bucket) == first and (Path(first) / "marker").exists()  # no second fetch
    (tmp_path / "m" / "model.safetensors").write_bytes(os.urandom(65))
    remote.upload(tmp_path / "m")  # retrained at the same URL
    second = local_model(str(remote), bucket)
    assert second != first and (Path(second) / "model.safetensors").stat().st_size == 65
    assert local_model("Salesforce/blip-image-captioning-base") == "Salesforce/blip-image-captioning-base"


def test_an_adapter_on_s3_brings_its_base_and_exports_name_urls_not_cache_paths(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVL_CACHE_DIR", str(tmp_path / "cache"))
    base_url = f"s3://{BUCKET}/run/train/tiny-init"
    write_model(tmp_path / "base")
    Location.of(base_url, bucket).upload(tmp_path / "base")
    write_model(tmp_path / "adapter", base=base_url)
    adapter_url = f"s3://{BUCKET}/run/train/model"
    Location.of(adapter_url, bucket).upload(tmp_path / "adapter")

    cached = Path(local_model(adapter_url, bucket))
    base = json.loads((cached / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).is_relative_to(tmp_path / "cache") and (Path(base) / "model.safetensors").is_file()

    # A model trained from the cached copies names them; what leaves the machine names the URLs again.
    target = Location.of(f"s3://{BUCKET}/run/next/model", bucket)
    with publishing(target) as staging:
        write_model(staging, base=base)
    exported = json.loads((target / "adapter_config.json").read_text())
    assert exported["base_model_name_or_path"] == base_url
    local_target = Location.of(tmp_path / "out" / "model")
    with publishing(local_target) as staging:
        write_model(staging, base=base)
    assert json.loads(Path(local_target.path, "adapter_config.json").read_text())["base_model_name_or_path"] == base_url
    assert not Path(local_target.path + ".partial").exists()


def test_portable_references_rewrites_a_folder_built_for_upload(tmp_path):
    write_model(tmp_path / "built" / "tiny-init", base=str(tmp_path / "built" / "tiny-init" / "base_lm"))
    portable_references(tmp_path / "built" / "tiny-init", moved=(str(tmp_path / "built"), "s3://b/run/train"))
    record = json.loads((tmp_path / "built" / "tiny-init" / "adapter_config.json").read_text())
    assert record["base_model_name_or_path"] == "s3://b/run/train/tiny-init/base_lm"


def test_serve_checkpoint_may_name_a_stage_or_model_folder_on_s3(bucket, tmp_path):
    from medvl.serve.checkpoint import resolve_checkpoint

    write_model(tmp_path / "m")
    run = f"s3://{BUCKET}/run"
    Location.of(f"{run}/train/model", bucket).upload(tmp_path / "m")
    write_summary(Location.of(f"{run}/train", bucket), {"model_dir": f"{run}/train/model"})

    def served(checkpoint: str) -> str:
        spec = parse_spec({"name": "t", "output_dir": run, "stages": ["train", "serve"],
                           "data": {"endpoint_url": bucket}, "serve": {"checkpoint": checkpoint}})
        return resolve_checkpoint(spec, "train")

    assert served("") == served(f"{run}/train") == served(f"{run}/train/model") == f"{run}/train/model"
    from medvl.spec import SpecError

    with pytest.raises(SpecError, match="serve.checkpoint: expected a model folder"):
        served(f"{run}/nothing-here")


def test_the_driver_files_of_an_output_dir_on_s3_go_back_to_it_and_leave_no_local_copy(bucket):
    from medvl.runs import driver_files

    layout = RunLayout.of(f"s3://{BUCKET}/runs/job", bucket)
    (layout.root / "medvl.log").write_text("first command\n")  # what an earlier command left
    with driver_files(layout) as copy:
        assert layout.driver_dir == copy and layout.log_file.read_text() == "first command\n"
        with open(layout.log_file, "a") as log:
            log.write("second command\n")
        layout.mlflow_db.write_bytes(b"SQLite format 3\x00")
        layout.tensorboard("train").mkdir(parents=True)
        (layout.tensorboard("train") / "events.out").write_bytes(b"e")
    assert not copy.exists()
    assert (layout.root / "medvl.log").read_text() == "first command\nsecond command\n"
    assert (layout.root / "mlflow.db").read_bytes() == b"SQLite format 3\x00"
    assert (layout.root / "tensorboard" / "train" / "events.out").read_bytes() == b"e"
    with pytest.raises(RuntimeError, match="only reachable inside runs.driver_files"):
        layout.driver_dir


def test_a_local_output_dir_is_its_own_driver_folder(tmp_path: Path):
    from medvl.runs import driver_files

    layout = RunLayout.of(tmp_path / "job")
    with driver_files(layout) as folder:
        assert folder == tmp_path / "job" == layout.log_file.parent
