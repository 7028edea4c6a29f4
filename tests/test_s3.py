"""prepare → train → eval with shards and checkpoints on S3 (a moto server on loopback), nothing on local disk.

The endpoint reaches the code only through ``data.endpoint_url`` (``AWS_ENDPOINT_URL`` is unset), and the
dummy credentials are set after Ray has started (session fixtures come first), so Ray's worker processes cannot
inherit either from the environment: the pyarrow filesystem the driver builds must carry them. Without keys a
worker's writes go out unsigned and moto refuses them (403). Needs moto ≥ 5.2.2: earlier servers answer
CompleteMultipartUpload with a root element pyarrow takes for an error.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from medvl.data.storage import filesystem_for
from medvl.spec import parse_spec

BUCKET = "medvl-test"


def pickled_options(fs) -> dict:
    """The options another process rebuilds the filesystem from (what pickling sends)."""
    return pickle.loads(pickle.dumps(fs)).__reduce__()[1][0]


def test_s3_filesystem_carries_endpoint_and_driver_keys(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SECRET")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    fs, path = filesystem_for("s3://bucket/some/prefix/", "http://127.0.0.1:9")
    options = pickled_options(fs)
    assert path == "bucket/some/prefix"
    assert (options["endpoint_override"], options["scheme"]) == ("http://127.0.0.1:9", "http")
    assert (options["access_key"], options["secret_key"], options["session_token"]) == ("AKID", "SECRET", "")


def test_without_keys_in_the_environment_each_process_uses_its_own_chain(monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    options = pickled_options(filesystem_for("s3://bucket/x")[0])
    assert (options["access_key"], options["endpoint_override"]) == (None, "")


def s3_keys(endpoint: str, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def s3_json(endpoint: str, key: str) -> dict:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    return json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())


@pytest.mark.slow
def test_prepare_train_eval_round_trip_through_s3(tmp_path: Path, ray_local, s3_endpoint):
    import boto3

    from medvl.stages import run_stages

    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    raw = {
        "name": "s3",
        "output_dir": str(tmp_path / "run"),
        "stages": ["prepare", "train", "eval"],
        "data": {"format": "synthetic", "synthetic_images": 120, "synthetic_image_size": 64, "image_size": 64,
                 "max_text_length": 32, "records_per_shard": 40, "shuffle_buffer": 0,
                 "shards": f"s3://{BUCKET}/shards", "endpoint_url": s3_endpoint},
        "model": {"recipe": "blip_caption", "preset": "tiny"},
        "train": {"epochs": 1, "max_steps": 3, "batch_size": 16, "lr": 2e-3, "cpus_per_worker": 0.5,
                  "max_val_batches": 1, "early_stopping_patience": 0, "storage_path": f"s3://{BUCKET}/ckpt"},
        "eval": {"max_samples": 8, "num_beams": 1, "max_new_tokens": 8, "semantic": False, "clinical": False},
    }
    spec = parse_spec(raw)
    run_stages(spec)

    manifest = s3_json(s3_endpoint, "shards/manifest.json")
    shard_keys = sorted(k for k in s3_keys(s3_endpoint, "shards/") if k.endswith(".parquet"))
    assert shard_keys == sorted(f"shards/{s['path']}" for s in manifest["shards"])
    assert sum(manifest["counts"].values()) == 120

    checkpoint_keys = s3_keys(s3_endpoint, "ckpt/train/")
    assert any("/checkpoint_" in k and k.endswith("model.safetensors") for k in checkpoint_keys), checkpoint_keys
    # What the driver exported came from the bucket, byte for byte a loadable model.
    summary = json.loads((Path(spec.output_dir) / "train" / "train_summary.json").read_text())
    assert (Path(summary["model_dir"]) / "model.safetensors").exists()

    metrics = json.loads((Path(spec.output_dir) / "eval" / "metrics.json").read_text())
    assert metrics  # scored something
    assert not (Path(spec.output_dir) / "shards").exists()
    assert not (Path(spec.output_dir) / "checkpoints").exists()
