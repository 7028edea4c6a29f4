"""cluster/: the AWS launcher config passes Ray's own validation, the KubeRay RayJob runs a valid medvl command."""
from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from medvl.cli import build_parser
from medvl.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def torch_pin() -> str:
    """The torch version .ci/setup installs: the cluster installs the same."""
    return re.search(r'"torch==([^"]+)"', (REPO / ".ci/setup").read_text()).group(1)


# --------------------------------------------------------------------------------------------- ray up


@pytest.fixture
def aws() -> dict:
    return yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())


def test_the_aws_config_passes_the_checks_ray_up_runs(aws):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(aws)))  # defaults merged, then Ray's JSON schema
    broken = copy.deepcopy(aws)
    broken["available_node_types"]["ray.worker.g5"]["resources"]["GPU"] = "one"
    with pytest.raises(Exception, match="not of type 'integer'"):  # the check can fail
        validate_config(prepare_config(broken))


def test_the_aws_config_has_a_cpu_head_and_gpu_workers(aws):
    assert aws["cluster_name"] and aws["provider"]["type"] == "aws" and aws["provider"]["region"]
    assert aws["auth"]["ssh_user"]
    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] > 0
    gpu_workers = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert {t["node_config"]["InstanceType"].split(".")[0] for t in gpu_workers.values()} >= {"g5", "p4d"}
    for t in gpu_workers.values():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= aws["max_workers"]


def test_the_aws_nodes_run_this_repo_with_the_tested_pins(aws):
    assert aws["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")  # the Ray medvl is tested with
    (remote,) = [remote for remote, local in aws["file_mounts"].items() if local == "."]  # the repo, from its root
    commands = aws["setup_commands"]
    assert any(f'"torch=={torch_pin()}"' in c for c in commands)
    torch_at = next(i for i, c in enumerate(commands) if "torch==" in c)
    medvl_at = next(i for i, c in enumerate(commands) if f"-e \"{remote}" in c)
    assert torch_at < medvl_at  # torch first and pinned, as .ci/setup does
    assert all("--dashboard-host=0.0.0.0" not in c for c in aws["head_start_ray_commands"])


# --------------------------------------------------------------------------------------------- KubeRay


@pytest.fixture
def rayjob() -> dict:
    return yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_the_rayjob_has_the_fields_kuberay_needs(rayjob):
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob") and rayjob["metadata"]["name"]
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    yaml.safe_load(spec["runtimeEnvYAML"])  # a YAML document inside the YAML
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert containers(cluster["headGroupSpec"])[0]["image"]
    (gpu,) = [g for g in cluster["workerGroupSpecs"] if containers(g)[0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    resources = containers(gpu)[0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]  # Kubernetes insists


def test_the_rayjob_entrypoint_is_a_medvl_run_of_a_shipped_spec_that_fits_its_cluster(rayjob, monkeypatch):
    monkeypatch.chdir(REPO)  # the head container's workingDir is the repository
    words = shlex.split(rayjob["spec"]["entrypoint"])
    assert words[0] == "medvl"
    args = build_parser().parse_args(words[1:])
    assert args.command == "run" and (REPO / args.spec).is_file() and args.spec.startswith("jobs/")
    job = load_spec(args.spec, args.overrides)

    cluster = rayjob["spec"]["rayClusterSpec"]
    head = containers(cluster["headGroupSpec"])[0]
    (gpu,) = cluster["workerGroupSpecs"]
    worker = containers(gpu)[0]
    assert head["workingDir"] == worker["workingDir"] == "/home/ray/medvl"
    assert "WORKDIR /home/ray/medvl" in (CLUSTER / "Dockerfile").read_text()

    def mounted(container: dict, path: str) -> bool:
        return any(Path(path).is_relative_to(m["mountPath"]) for m in container["volumeMounts"])

    # output_dir is one folder for the driver (head) and the Train workers (GPU pods); the data is on the head.
    assert Path(job.output_dir).is_absolute() and mounted(head, job.output_dir) and mounted(worker, job.output_dir)
    assert mounted(head, job.data.source)
    # Enough GPUs and CPUs for the spec's Train workers.
    assert job.train.use_gpu and job.train.workers <= gpu["replicas"] * worker["resources"]["limits"]["nvidia.com/gpu"]
    assert job.train.cpus_per_worker <= float(worker["resources"]["limits"]["cpu"])


def test_the_image_is_built_on_the_tested_ray_and_pins():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-" in dockerfile
    assert f'"torch=={torch_pin()}"' in dockerfile
    ignored = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored)


# --------------------------------------------------------------------------------------------- Java for eval


def installs_a_jre(command: str) -> bool:
    return bool(re.search(r"apt-get install\b.*\bdefault-jre-headless\b", command.replace("\\\n", " ")))


def test_the_image_and_the_aws_nodes_install_a_java_runtime_for_meteor(aws, rayjob):
    """METEOR and the PTB tokenizer are Java: every place `medvl eval` runs on a cluster has a JRE."""
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    runs = [step for step in re.split(r"\n(?=[A-Z]+ )", dockerfile) if step.startswith("RUN ")]
    assert any(installs_a_jre(step) and "java -version" in step for step in runs), "cluster/Dockerfile: no JRE"
    assert "USER ray" in dockerfile.split("default-jre-headless", 1)[1]  # back to the image's own user after apt
    assert any(installs_a_jre(c) for c in aws["setup_commands"]), "cluster/aws-gpu.yaml: no JRE"
    # KubeRay runs the image built from cluster/Dockerfile, so its pods have the same JRE.
    cluster = rayjob["spec"]["rayClusterSpec"]
    images = {containers(cluster["headGroupSpec"])[0]["image"]} | {containers(g)[0]["image"]
                                                                   for g in cluster["workerGroupSpecs"]}
    assert not any(image.startswith("rayproject/") for image in images)
    print("cluster/Dockerfile and cluster/aws-gpu.yaml install a headless JRE (default-jre-headless); "
          "the KubeRay pods run the Dockerfile's image")


def test_installs_a_jre_can_fail():
    assert not installs_a_jre("apt-get install -y curl") and installs_a_jre("apt-get install -y default-jre-headless")
