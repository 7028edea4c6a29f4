"""One spec on a real two-node Ray cluster with its state on object storage, no shared disk relied on.

Two ``ray start`` processes on loopback make the cluster (``ray.cluster_utils.Cluster`` could not be reached on
loopback here): a head and a second node, 2 CPUs and a custom resource each, both ended by signalling their own
process groups (never ``ray stop``, which would end other Rays on the machine). The job runs as a user runs it,
``medvl run`` in a process of its own joining the cluster through ``RAY_ADDRESS``, with ``output_dir`` on S3
(moto on loopback): prepare → train (2 workers, one per node) → tune (2 trials) → eval.

The nodes share this machine's disk, so isolation proves nothing: the test asserts where files went. Every
output is in the bucket; outside Ray's temp dir (which also holds the nodes' model cache) the driver's working
directory stays empty and no output file lands anywhere under the test's folders (its HOME and TMPDIR
included). Each Train run's two workers ran on two different nodes (Ray's state API says where).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import free_port
from ray_head import stop_ray_start

REPO = Path(__file__).resolve().parents[1]
BUCKET = "medvl-multinode"
NODE_CPUS = 2
# Output files of a run folder: none of these may appear on the local filesystem outside Ray's temp dir.
OUTPUT_NAMES = ("train_summary.json", "run_spec.json", "metrics.json", "predictions.jsonl", "report.md",
                "manifest.json", "trials.csv", "trials.md", "job.yaml", "search_settings.json", "base_model.json",
                "trial_starts.jsonl", "model.safetensors", "multinode.json")

pytestmark = pytest.mark.slow


def ray_start(temp_dir: Path, head_port: int, head: bool, resources: dict, log: Path, env: dict) -> subprocess.Popen:
    """``ray start --block`` of one node on loopback with every port its own (the head listens on ``head_port``)."""
    ray = Path(sys.executable).with_name("ray")
    ports = {name: free_port() for name in ("node-manager-port", "object-manager-port", "metrics-export-port",
                                            "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                            "runtime-env-agent-port")}
    command = [str(ray) if ray.exists() else "ray", "start", "--block", "--node-ip-address", "127.0.0.1",
               "--num-cpus", str(NODE_CPUS), "--num-gpus", "0", "--resources", json.dumps(resources),
               "--object-store-memory", str(300 * 1024 * 1024), "--temp-dir", str(temp_dir), "--disable-usage-stats",
               *(f"--{name}={port}" for name, port in ports.items())]
    if head:
        command += ["--head", f"--port={head_port}", "--include-dashboard=true", "--dashboard-host", "127.0.0.1",
                    f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}"]
    else:
        command += ["--address", f"127.0.0.1:{head_port}"]
    with open(log, "w") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_started(process: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while "Ray runtime started" not in log.read_text():
        assert process.poll() is None, f"ray start exited: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no node after {timeout_s} s: {log.read_text()[-3000:]}"
        time.sleep(1)


@pytest.fixture
def cluster(s3_endpoint):
    """Two nodes joined into one cluster; yields (GCS address, the job's environment, the test's root folder)."""
    root = Path(tempfile.mkdtemp(prefix="mn-", dir="/tmp"))  # short: Ray's socket paths live under it
    ray_temp = root / "ray"
    for folder in ("home", "tmp", "cwd", "inputs"):
        (root / folder).mkdir()
    # HOME and TMPDIR point into the test's folder, so whatever medvl or Ray writes there is looked at.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "240", "RAY_raylet_start_wait_time_s": "300", "HOME": str(root / "home"), "TMPDIR": str(root / "tmp"),
           "MEDVL_CACHE_DIR": str(ray_temp / "medvl-cache"), "PYTHONPATH": str(REPO),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    head_port = free_port()
    nodes = []
    try:
        for name, head in (("node_head", True), ("node_b", False)):
            log = root / "inputs" / f"{name}.log"
            nodes.append(ray_start(ray_temp, head_port, head, {name: 1}, log, env))
            wait_started(nodes[-1], log)
        yield f"127.0.0.1:{head_port}", env, root
    finally:
        for process in reversed(nodes):
            stop_ray_start(process)
        shutil.rmtree(root, ignore_errors=True)


def job_spec(root: Path, endpoint: str) -> Path:
    """prepare → train → tune → eval on 100 synthetic 48-px images, a few steps each, everything on S3."""
    space = root / "inputs" / "space.yaml"
    space.write_text(yaml.safe_dump({"train.lr": {"grid": [2e-3, 5e-3]}}))
    spec = {
        "name": "multinode",
        "output_dir": f"s3://{BUCKET}/runs/multinode",
        "stages": ["prepare", "train", "tune", "eval"],
        "data": {"format": "synthetic", "synthetic_images": 100, "synthetic_image_size": 48, "image_size": 48,
                 "max_text_length": 32, "records_per_shard": 40, "shuffle_buffer": 0, "endpoint_url": endpoint},
        "model": {"recipe": "blip_caption", "preset": "tiny"},
        # 1.25 CPUs per worker: two never fit on one 2-CPU node, so the two workers run on the two nodes.
        "train": {"workers": 2, "cpus_per_worker": 1.25, "epochs": 1, "max_steps": 2, "batch_size": 8, "lr": 2e-3,
                  "max_val_batches": 1, "early_stopping_patience": 0},
        "tune": {"space": str(space), "scheduler": "none", "max_steps": 2},
        "ray": {"connect_timeout_s": 300},  # joining a head on a loaded machine
        # Two eval actors (one per node, as their CPUs fit), the untrained baseline generated beside the model.
        "eval": {"max_samples": 8, "num_beams": 1, "max_new_tokens": 8, "batch_size": 2, "semantic": False,
                 "clinical": False, "attention_maps": 1, "baselines": ["untrained"], "workers": 2, "num_cpus": 1},
    }
    path = root / "inputs" / "multinode.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def bucket_keys(endpoint: str, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def train_worker_nodes(address: str, env: dict) -> list[list[str]]:
    """The node ids of each Train run's workers, per worker group (its placement group), from Ray's state API."""
    code = ("import json, collections\n"
            "from ray.util.state import list_actors\n"
            f"actors = list_actors(address={address!r}, filters=[('class_name', '=', 'RayTrainWorker')], "
            "detail=True, limit=10000)\n"
            "groups = collections.defaultdict(list)\n"
            "for a in actors: groups[a.placement_group_id].append(a.node_id)\n"
            "print(json.dumps(list(groups.values())))\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_spec_runs_on_two_nodes_with_every_output_in_the_bucket(cluster, s3_endpoint):
    import boto3

    address, env, root = cluster
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    spec_path = job_spec(root, s3_endpoint)
    started = time.monotonic()
    log = root / "inputs" / "job.log"
    with open(log, "w") as out:
        job = subprocess.run([sys.executable, "-m", "medvl.cli", "run", str(spec_path)], cwd=root / "cwd",
                             env={**env, "RAY_ADDRESS": address}, stdout=out, stderr=subprocess.STDOUT, timeout=1800)
    text = log.read_text()
    print(f"multi-node job: {time.monotonic() - started:.0f} s", file=sys.stderr)
    assert job.returncode == 0, text[-6000:]
    assert "[medvl] ray: joined" in text and "[medvl] ray: started" not in text
    assert "\r" not in text  # piped: progress prints plain lines, never redraws
    assert re.search(r"^\[medvl tune\] 2/2 trials \(100%\), running 0, stopped early 0, finished 2, best val_loss ",
                     text, re.M)

    keys = set(bucket_keys(s3_endpoint, "runs/multinode/"))
    run = "runs/multinode/"
    expected = ["shards/manifest.json", "train/model/model.safetensors", "train/train_summary.json",
                "train/run_spec.json", "tune/search_settings.json", "tune/trials.csv", "tune/trials.md",
                "tune/val_loss_curves.png", "tune/trial_starts.jsonl", "tune/base_model.json",
                "tune/best/model/model.safetensors", "tune/best/job.yaml", "tune/train_summary.json",
                "eval/metrics.json", "eval/predictions.jsonl", "eval/report.md", "multinode.json",
                "medvl.log", "mlflow.db"]  # the driver's own files too (runs.driver_files)
    missing = [key for key in expected if run + key not in keys]
    assert not missing, (missing, sorted(keys))
    assert any(key.startswith(run + "checkpoints/train/checkpoint_") for key in keys)
    assert any(key.startswith(run + "tune/search/experiment_state-") for key in keys)  # Tune's state, restorable
    trials = [key for key in keys if key.startswith(run + "tune/trials/") and key.endswith("train_summary.json")]
    assert len(trials) == 2, sorted(keys)
    assert any(key.startswith(run + "eval/attention/") for key in keys)
    from ray import tune

    from medvl.storage import filesystem_for

    filesystem, experiment = filesystem_for(f"s3://{BUCKET}/{run}tune/search", s3_endpoint)
    assert tune.Tuner.can_restore(experiment, storage_filesystem=filesystem)  # a rerun would resume it from S3
    tune_summary = json.loads(boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").get_object(
        Bucket=BUCKET, Key=run + "tune/train_summary.json")["Body"].read())
    assert tune_summary["model_dir"] == f"s3://{BUCKET}/{run}tune/best/model"
    driver_log = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").get_object(
        Bucket=BUCKET, Key=run + "medvl.log")["Body"].read().decode()
    assert "Connecting to existing Ray cluster" in driver_log and "Started a local Ray instance" not in driver_log

    # Nothing local outside Ray's temp dir: the driver's working directory is empty, and no output file is
    # anywhere else under the test's folders (HOME and TMPDIR of every process included).
    assert list((root / "cwd").iterdir()) == []
    outside = [path for path in root.rglob("*") if path.is_file() and not path.is_relative_to(root / "ray")]
    leaked = [path for path in outside if path.name in OUTPUT_NAMES or path.suffix == ".parquet"
              or "multinode" in path.relative_to(root).parts[1:]]
    assert not leaked, leaked
    assert not any(path.name.startswith("s3:") for path in root.rglob("s3:*"))

    # Each Train run (the train stage, each trial) had one worker on each node.
    groups = train_worker_nodes(address, env)
    assert len(groups) == 3 and all(len(nodes) == 2 and len(set(nodes)) == 2 for nodes in groups), groups
