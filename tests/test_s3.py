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


# The quickstart cut down to seconds of work, its baselines and attention overlays kept.
TINY = ["data.synthetic_images=160", "data.synthetic_image_size=64", "data.image_size=64",
        "data.records_per_shard=64", "train.epochs=1", "train.batch_size=16", "train.max_val_batches=2",
        "eval.max_samples=8", "eval.num_beams=1", "eval.max_new_tokens=8", "eval.batch_size=8",
        "eval.attention_maps=2", "eval.semantic=false"]
REPO = Path(__file__).resolve().parents[1]


def with_sets(overrides: list[str]) -> list[str]:
    return [word for override in overrides for word in ("--set", override)]


@pytest.mark.slow
def test_medvl_run_and_serve_the_quickstart_with_output_dir_on_s3(tmp_path: Path, ray_local, s3_endpoint,
                                                                    monkeypatch):
    """`medvl run` writes every output to the bucket, nothing to a local folder; `medvl serve` of the same spec
    answers /v1/caption from the model there (fetched into its replica's cache)."""
    import base64
    import io
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import boto3
    import requests
    from PIL import Image

    from medvl.cli import main

    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # a relative output_dir, or one named after the URL, would land here
    sets = [*TINY, f"output_dir=s3://{BUCKET}/runs/quickstart", f"data.endpoint_url={s3_endpoint}"]
    assert main(["run", str(REPO / "jobs/quickstart.yaml"), *with_sets(sets)]) == 0

    keys = set(s3_keys(s3_endpoint, "runs/quickstart/"))
    prefix = "runs/quickstart/"
    for key in ("quickstart.json", "eval/metrics.json", "eval/predictions.jsonl", "eval/report.md",
                "train/model/model.safetensors", "train/model/config.json", "train/train_summary.json",
                "shards/manifest.json"):
        assert prefix + key in keys, sorted(keys)
    assert len([k for k in keys if k.startswith(prefix + "eval/attention/") and k.endswith(".png")]) == 2
    assert any(k.startswith(prefix + "checkpoints/train/") for k in keys)
    comparison = s3_json(s3_endpoint, prefix + "quickstart.json")
    assert set(comparison) == {"trained", "untrained", "shuffled_images"} and comparison["trained"]["n"] == 8
    summary = s3_json(s3_endpoint, prefix + "train/train_summary.json")
    assert summary["model_dir"] == f"s3://{BUCKET}/runs/quickstart/train/model"
    assert list(work.iterdir()) == []

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "MEDVL_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "serve.log"
    process = subprocess.Popen([sys.executable, "-m", "medvl.cli", "serve", str(REPO / "jobs/quickstart.yaml"),
                                *with_sets([*sets, f"serve.port={port}", "serve.num_cpus=0.5", "ray.num_cpus=2"])],
                               stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=work)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(2)
        image = io.BytesIO()
        Image.new("RGB", (64, 64), (90, 90, 90)).save(image, format="PNG")
        answer = requests.post(f"{url}/v1/caption", json={"image": base64.b64encode(image.getvalue()).decode()},
                               timeout=120)
        assert answer.status_code == 200, answer.text + log.read_text()[-3000:]
        assert isinstance(answer.json()["text"], str)
        assert requests.get(f"{url}/v1/model", timeout=60).json()["model"] == "train"  # its path in output_dir
        cached = list((tmp_path / "cache").rglob("model.safetensors"))
        assert len(cached) == 1 and "s3/medvl-test/runs/quickstart/train/model" in cached[0].as_posix()
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                process.kill()
    assert list(work.iterdir()) == []
