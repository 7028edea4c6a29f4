"""A stage asking for GPUs or CPUs the cluster lacks fails before it starts workers, naming the field; with an
autoscaler it first waits (a line every 30 s) up to ray.resource_wait_s."""
from __future__ import annotations

from pathlib import Path

import pytest

from medvl.resources import Cluster, ResourceCheck, shortfall, stage_asks
from medvl.spec import SpecError, StageSpec, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[1]
CPU_ONLY = Cluster({"CPU": 2.0}, [{"CPU": 2.0}])
ONE_GPU = Cluster({"CPU": 8.0, "GPU": 1.0}, [{"CPU": 8.0, "GPU": 1.0}])


def spec(**sections):
    return parse_spec({"name": "r", "output_dir": "/tmp/unused", "stages": ["prepare", "train", "eval", "serve"],
                       "model": {"preset": "tiny"}, **sections})


def problem(job, kind: str, cluster: Cluster) -> str | None:
    return next((p for ask in stage_asks(job, kind) if (p := shortfall(job, ask, cluster))), None)


@pytest.mark.parametrize("sections, kind, cluster, message", [
    ({"train": {"use_gpu": True}}, "train", CPU_ONLY,
     "train.use_gpu: expected false on this cluster (no node has a GPU; each Train worker asks for 1), got true"),
    ({"train": {"use_gpu": True, "workers": 2}}, "train", ONE_GPU,
     "train.workers: expected at most 1 (1 GPUs per Train worker; the cluster has 1 GPUs), got 2"),
    ({"train": {"workers": 4, "cpus_per_worker": 1}}, "train", CPU_ONLY, "train.workers: expected at most 1"),
    ({"train": {"cpus_per_worker": 3}}, "train", CPU_ONLY,
     "train.cpus_per_worker: expected at most 2 on this cluster (the largest node has 2 CPUs"),
    ({"eval": {"num_gpus": 1}}, "eval", CPU_ONLY, "eval.num_gpus: expected at most 0 on this cluster (no node has"),
    ({"eval": {"num_gpus": 1, "workers": 2}}, "eval", ONE_GPU, "eval.workers: expected at most 1"),
    ({"serve": {"num_gpus": 0.5}}, "serve", CPU_ONLY, "serve.num_gpus: expected at most 0"),
    ({"train": {"use_gpu": True}, "tune": {"gpus_per_trial": 2, "space": "tune_spaces/blip2_lora.yaml"}}, "tune",
     ONE_GPU, "tune.gpus_per_trial: expected at most 1 on this cluster (the largest node has 1 GPUs"),
    ({"train": {"use_gpu": True}, "tune": {"space": "tune_spaces/blip2_lora.yaml"}}, "tune", CPU_ONLY,
     "train.use_gpu: expected false"),
])
def test_a_shortfall_names_the_field_to_change(sections, kind, cluster, message):
    found = problem(spec(**sections), kind, cluster)
    assert found is not None and found.startswith(message), found


def test_what_fits_passes():
    assert problem(spec(train={"use_gpu": True}, eval={"num_gpus": 1}), "train", ONE_GPU) is None
    assert problem(spec(eval={"num_gpus": 1}), "eval", ONE_GPU) is None
    assert problem(spec(train={"cpus_per_worker": 0.5}), "train", CPU_ONLY) is None
    assert stage_asks(spec(), "prepare") == []


class FakeTime:
    def __init__(self):
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_without_an_autoscaler_every_stage_is_checked_before_the_first_runs():
    job = spec(eval={"num_gpus": 1})
    check = ResourceCheck(job, cluster=lambda: CPU_ONLY, can_grow=lambda: False)
    with pytest.raises(SpecError, match="^eval.num_gpus: "):
        check.before_all(job.stages)


def test_with_an_autoscaler_a_stage_waits_printing_every_30_s_then_fails(capsys):
    job = spec(train={"use_gpu": True}, ray={"resource_wait_s": 100})
    fake, requests = FakeTime(), []
    check = ResourceCheck(job, cluster=lambda: CPU_ONLY, can_grow=lambda: True, clock=fake.clock,
                          sleep=fake.sleep, request=requests.append)
    check.before_all(job.stages)  # an autoscaler may add them: nothing fails up front
    with pytest.raises(SpecError) as info:
        check.before(StageSpec(kind="train", name="train"))
    assert str(info.value).startswith("train.use_gpu: expected false on this cluster")
    assert "ray.resource_wait_s" in str(info.value) and fake.now >= 100
    lines = [line for line in capsys.readouterr().out.splitlines() if "waiting for the autoscaler" in line]
    assert len(lines) == 4  # at 0, 30, 60 and 90 s
    assert requests == [[{"CPU": 1.0, "GPU": 1.0}], []]  # asked for, then withdrawn


def test_with_an_autoscaler_a_stage_goes_on_once_the_nodes_arrive(capsys):
    job = spec(train={"use_gpu": True})
    fake, requests = FakeTime(), []
    check = ResourceCheck(job, cluster=lambda: ONE_GPU if fake.now >= 40 else CPU_ONLY, can_grow=lambda: True,
                          clock=fake.clock, sleep=fake.sleep, request=requests.append)
    check.before(StageSpec(kind="train", name="train"))
    assert 40 <= fake.now < 50 and requests[-1] == []


@pytest.mark.slow
def test_a_gpu_spec_on_a_ray_without_gpus_fails_before_its_first_stage(ray_local, tmp_path):
    """The acceptance case: jobs/roco_blip_caption.yaml (train.use_gpu: true) on this GPU-less machine."""
    from medvl.stages import run_stages

    job = load_spec(REPO / "jobs/roco_blip_caption.yaml",
                    ["model.preset=tiny", "data.format=synthetic", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(SpecError, match="^train.use_gpu: expected false on this cluster"):
        run_stages(job)
    # Not even prepare ran: the run folder holds only the log of what the driver printed.
    assert [path.name for path in (tmp_path / "run").iterdir()] == ["medvl.log"]
