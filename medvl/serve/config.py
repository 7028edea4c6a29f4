"""The deployment's settings derived from ``serve``, and the Serve config file ``serve deploy`` takes.

The file names the application builder (:func:`medvl.serve.app.build_app`) and its arguments: the spec (what
the replica needs to rebuild the recipe), the resolved checkpoint and the API key's salted HMAC
(:mod:`medvl.serve.auth`). Its ``deployments`` section repeats the replica count, autoscaling and resources so
that they can be edited in the file without touching the spec.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from medvl.spec import JobSpec, ServeSpec
from medvl.storage import absolute

APP_IMPORT_PATH = "medvl.serve.app:build_app"
DEPLOYMENT_NAME = "MedvlServer"


def deployment_options(settings: ServeSpec) -> dict:
    """Keyword arguments of ``Deployment.options`` (and the config file's deployment entry)."""
    options: dict = {
        "ray_actor_options": {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus},
        # A replica never batches more requests than it is allowed to hold at once.
        "max_ongoing_requests": settings.max_ongoing_requests or 2 * settings.max_batch_size,
    }
    if settings.autoscaling_max_replicas:
        options["autoscaling_config"] = {
            "min_replicas": settings.autoscaling_min_replicas,
            "max_replicas": settings.autoscaling_max_replicas,
            "target_ongoing_requests": settings.autoscaling_target_ongoing_requests or settings.max_batch_size,
        }
    else:
        options["num_replicas"] = settings.num_replicas
    return options


def app_args(spec: JobSpec, checkpoint: str, api_key_digest: str, adapters: list[dict] | None = None) -> dict:
    """What :func:`medvl.serve.app.build_app` takes: plain data (it travels in the config file).

    The spec keeps what the replica needs (recipe, data and generation settings, serve). The replica only parses
    it (pure: no file it names is opened there), so paths of the submitting machine do no harm.
    """
    raw = dataclasses.asdict(spec)
    raw["stages"] = [{"kind": "serve", "name": "serve"}]
    raw["output_dir"] = absolute(spec.output_dir)
    return {"spec": raw, "checkpoint": checkpoint, "api_key_hmac": api_key_digest, "adapters": adapters or []}


def serve_config(spec: JobSpec, checkpoint: str, api_key_digest: str, adapters: list[dict] | None = None) -> dict:
    """A Serve config (the ``serve build`` layout), validated against Ray's own schema."""
    from ray.serve.schema import ServeDeploySchema

    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": spec.serve.host, "port": spec.serve.port},
        "applications": [{
            "name": spec.name,
            "route_prefix": "/",
            "import_path": APP_IMPORT_PATH,
            "args": app_args(spec, checkpoint, api_key_digest, adapters),
            "deployments": [{"name": DEPLOYMENT_NAME, **deployment_options(spec.serve)}],
        }],
    }
    ServeDeploySchema.model_validate(config)
    return config


def write_serve_config(config: dict, path: Path) -> None:
    header = ("# Ray Serve config written by `medvl serve --write-config`; deploy with `serve deploy <this file>`.\n"
              "# The cluster needs medvl installed and the checkpoint below: a folder every replica's node has, or\n"
              "# an s3:// URL the nodes can read (each replica fetches it into its node's cache).\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(config, sort_keys=False, width=100))
