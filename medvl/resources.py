"""Does the cluster have what a stage asks for? Checked before a stage starts its workers.

Ray waits, without end and without a word, for resources no node has: ``train.use_gpu: true`` on a Ray without
GPUs retried the worker group's start until it was killed. So each stage's demand (Train workers, eval actors,
Serve replicas, one Tune trial) is compared with the cluster first, and a shortfall is one line naming the
field to change: ``train.use_gpu: expected false on this cluster (no node has a GPU…), got true``.

What happens then depends on whether anything can add nodes:

* No autoscaler (a Ray medvl started, ``ray start`` nodes, a fixed KubeRay cluster): nothing will ever change,
  so every stage of the job is checked before the first one runs and the job fails at once.
* An autoscaler (``cluster/aws-gpu.yaml``, KubeRay with autoscaling): the stage asks it for the bundles
  (``ray.autoscaler.sdk.request_resources``) and waits, with a line every 30 s, up to ``ray.resource_wait_s``;
  then it fails the same way. The request is withdrawn either way: the stage's own workers keep the nodes busy.

Whether an autoscaler runs is read from the status Ray's monitor publishes: without one the monitor runs
read-only and names every node type after the node's id (``node_<hex id>``).
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable

from medvl.spec import JobSpec, SpecError, StageSpec

WAIT_MESSAGE_EVERY_S = 30.0
POLL_EVERY_S = 5.0
_READONLY_NODE_TYPE = re.compile(r"^node_[0-9a-f]{40,}$")


@dataclass(frozen=True)
class Ask:
    """``count`` bundles of ``bundle`` (one per worker, actor or replica), plus ``beside``: resources the stage
    holds besides them (Ray Data's read and preprocessing tasks). ``fields``: the spec field setting each
    resource of a bundle; ``count_field``: the one setting the count."""

    what: str  # "Train worker", "eval actor"…, for the message
    count: int
    bundle: dict[str, float]
    fields: dict[str, str]
    count_field: str
    beside: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Cluster:
    totals: dict[str, float]
    nodes: list[dict[str, float]]  # each alive node's total resources


# --------------------------------------------------------------------------------------------- what stages ask


def stage_asks(spec: JobSpec, kind: str) -> list[Ask]:
    """What a stage of ``kind`` (run with ``spec``, its own overrides applied) asks of the cluster."""
    if kind == "train":
        return [_train_ask(spec)]
    if kind == "tune":
        return [_trial_ask(spec)]
    if kind == "eval":
        return [_eval_ask(spec)]
    if kind == "serve":
        return [_serve_ask(spec)]
    return []  # prepare runs on the driver


def _data_reservation(spec: JobSpec) -> float:
    from medvl.data.pipeline import READ_CPUS

    return 2 * spec.data.preprocess_workers * spec.data.preprocess_cpus + READ_CPUS  # train + val pools, reads


def _train_ask(spec: JobSpec) -> Ask:
    settings = spec.train
    bundle = {"CPU": settings.cpus_per_worker, "GPU": 1.0 if settings.use_gpu else 0.0}
    return Ask("Train worker", settings.workers, bundle, {"CPU": "train.cpus_per_worker", "GPU": "train.use_gpu"},
               "train.workers", {"CPU": _data_reservation(spec)})


def _trial_ask(spec: JobSpec) -> Ask:
    """One trial's Train workers (trials beyond what fits wait their turn: tune.max_concurrent_trials)."""
    from medvl.tune.search import TRIAL_DRIVER_CPUS

    settings, tune = spec.train, spec.tune
    cpus = (tune.cpus_per_trial / settings.workers) if tune.cpus_per_trial else settings.cpus_per_worker
    cpu_field = "tune.cpus_per_trial" if tune.cpus_per_trial else "train.cpus_per_worker"
    if tune.gpus_per_trial:
        gpus, gpu_field = tune.gpus_per_trial / settings.workers, "tune.gpus_per_trial"
    else:
        gpus, gpu_field = (1.0 if settings.use_gpu else 0.0), "train.use_gpu"
    return Ask("Train worker of a trial", settings.workers, {"CPU": cpus, "GPU": gpus},
               {"CPU": cpu_field, "GPU": gpu_field}, "train.workers",
               {"CPU": _data_reservation(spec) + TRIAL_DRIVER_CPUS})


def _eval_ask(spec: JobSpec) -> Ask:
    from medvl.data.pipeline import READ_CPUS

    settings = spec.eval
    return Ask("eval actor", settings.workers, {"CPU": settings.num_cpus, "GPU": settings.num_gpus},
               {"CPU": "eval.num_cpus", "GPU": "eval.num_gpus"}, "eval.workers", {"CPU": READ_CPUS})


def _serve_ask(spec: JobSpec) -> Ask:
    settings = spec.serve
    replicas = settings.autoscaling_min_replicas if settings.autoscaling_max_replicas else settings.num_replicas
    count_field = "serve.autoscaling_min_replicas" if settings.autoscaling_max_replicas else "serve.num_replicas"
    return Ask("Serve replica", max(1, replicas), {"CPU": settings.num_cpus, "GPU": settings.num_gpus},
               {"CPU": "serve.num_cpus", "GPU": "serve.num_gpus"}, count_field)


# --------------------------------------------------------------------------------------------- the check


def shortfall(spec: JobSpec, ask: Ask, cluster: Cluster) -> str | None:
    """The one-line problem when ``cluster`` cannot hold ``ask``, else None."""
    for resource, amount in ask.bundle.items():
        if amount <= 0:
            continue
        largest = max((node.get(resource, 0.0) for node in cluster.nodes), default=0.0)
        if largest + 1e-9 < amount:  # one bundle fits on no node
            where = f"no node has a {resource}" if largest == 0 else f"the largest node has {largest:g} {resource}s"
            return _expected(spec, ask.fields[resource], amount, largest, f"{where}; each {ask.what} asks for {amount:g}")
        have, beside = cluster.totals.get(resource, 0.0), ask.beside.get(resource, 0.0)
        if have + 1e-9 < ask.count * amount + beside:
            fits = max(0, math.floor((have - beside) / amount + 1e-9))
            reserved = f" beside {beside:g} for Ray Data" if beside else ""
            return (f"{ask.count_field}: expected at most {fits} ({amount:g} {resource}s per {ask.what}{reserved}; the "
                    f"cluster has {have:g} {resource}s), got {ask.count}")
    return None


def _expected(spec: JobSpec, field_path: str, amount: float, largest: float, why: str) -> str:
    value = _value(spec, field_path)
    if isinstance(value, bool):
        return f"{field_path}: expected false on this cluster ({why}), got true"
    bound = f"at most {largest:g}" if math.isclose(value, amount) else "less"
    return f"{field_path}: expected {bound} on this cluster ({why}), got {value:g}"


def _value(spec: JobSpec, field_path: str):
    node = spec
    for part in field_path.split("."):
        node = getattr(node, part)
    return node


def current_cluster() -> Cluster:
    import ray

    nodes = [{k: float(v) for k, v in node["Resources"].items()} for node in ray.nodes() if node["Alive"]]
    return Cluster({k: float(v) for k, v in ray.cluster_resources().items()}, nodes)


def cluster_can_grow() -> bool:
    """Whether an autoscaler may add nodes (see the module docstring for how this is read)."""
    names = _node_type_names()
    return any(not _READONLY_NODE_TYPE.match(name) for name in names)


def _node_type_names(wait_s: float = 10.0) -> list[str]:
    """Node type names in the monitor's published status (it appears within seconds of the head's start)."""
    from ray._private import ray_constants
    from ray.experimental import internal_kv

    deadline = time.monotonic() + wait_s
    while True:
        raw = internal_kv._internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        if raw:
            report = json.loads(raw).get("autoscaler_report") or {}
            mapping = report.get("node_type_mapping") or {}
            return [*mapping.values(), *(report.get("active_nodes") or {}), *(report.get("pending_launches") or {})]
        if _autoscaler_v2():
            return _v2_node_type_names()
        if time.monotonic() >= deadline:
            return []  # no monitor publishing: nothing adds nodes
        time.sleep(0.5)


def _autoscaler_v2() -> bool:
    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        return is_autoscaler_v2()
    except Exception:  # an older or newer Ray without it: the legacy status is all there is
        return False


def _v2_node_type_names() -> list[str]:
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status

    status = get_cluster_status(ray.get_runtime_context().gcs_address)
    return [node.ray_node_type_name for node in [*status.active_nodes, *status.idle_nodes]]


# --------------------------------------------------------------------------------------------- the stages


@dataclass
class ResourceCheck:
    """Checks a job's stages against the cluster: all at once without an autoscaler, each before it runs
    (waiting for the autoscaler) with one. The hooks are for tests."""

    spec: JobSpec
    cluster: Callable[[], Cluster] = current_cluster
    can_grow: Callable[[], bool] = cluster_can_grow
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    request: Callable[[list[dict[str, float]]], None] | None = None
    _grows: bool | None = None

    @property
    def grows(self) -> bool:
        if self._grows is None:
            self._grows = self.can_grow()
        return self._grows

    def before_all(self, stages: list[StageSpec]) -> None:
        """Without an autoscaler: fail now, before the first stage, if any stage asks for too much."""
        if self.grows:
            return
        for stage in stages:
            self.before(stage)

    def before(self, stage: StageSpec) -> None:
        """Fail (no autoscaler), or wait up to ``ray.resource_wait_s`` for the autoscaler, when the stage's
        demand is not met."""
        stage_spec = self.spec.for_stage(stage)
        for ask in stage_asks(stage_spec, stage.kind):
            problem = shortfall(stage_spec, ask, self.cluster())
            if problem and not self.grows:
                raise SpecError(problem)
            if problem:
                self._wait(stage_spec, ask, stage)

    def _wait(self, spec: JobSpec, ask: Ask, stage: StageSpec) -> None:
        request = self.request or _request_resources
        limit = spec.ray.resource_wait_s
        bundles = [{k: v for k, v in ask.bundle.items() if v > 0} for _ in range(ask.count)]
        request(bundles)
        started = self.clock()
        next_message = started
        try:
            while problem := shortfall(spec, ask, self.cluster()):
                waited = self.clock() - started
                if waited >= limit:
                    raise SpecError(f"{problem} (the autoscaler added nothing in {limit:g} s: ray.resource_wait_s)")
                if self.clock() >= next_message:
                    print(f"[medvl] stage {stage.name}: waiting for the autoscaler ({waited:.0f} of {limit:g} s, "
                          f"ray.resource_wait_s): {problem}", flush=True)
                    next_message += WAIT_MESSAGE_EVERY_S
                self.sleep(POLL_EVERY_S)
        finally:
            request([])


def _request_resources(bundles: list[dict[str, float]]) -> None:
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)
