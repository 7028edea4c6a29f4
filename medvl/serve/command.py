"""The serve stage (``medvl serve SPEC``): deploy the model, block until SIGINT/SIGTERM, shut Serve down."""
from __future__ import annotations

import signal
import threading
from pathlib import Path

from medvl.serve.adapters import resolve_adapters
from medvl.serve.auth import api_key_digest
from medvl.serve.checkpoint import resolve_checkpoint
from medvl.serve.config import app_args, serve_config, write_serve_config
from medvl.spec import JobSpec, StageSpec

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run_serve_stage(spec: JobSpec, stage: StageSpec, last_train: str | None) -> None:
    """Serve until interrupted; raises SpecError (before Serve starts) when there is no model or no API key."""
    from ray import serve

    adapters = resolve_adapters(spec)
    checkpoint = adapters[0]["folder"] if adapters else resolve_checkpoint(spec, last_train)
    digest = api_key_digest(spec.serve)
    with StopSignals() as stop:  # installed first: a signal during start-up still ends in a clean shutdown
        try:
            serve.start(http_options={"host": spec.serve.host, "port": spec.serve.port})
            deploy(spec, checkpoint, digest, adapters)
            url = f"http://{spec.serve.host}:{spec.serve.port}"
            print(f"[medvl serve] {stage.name}: {spec.model.recipe} from {checkpoint} at {url}/v1/… "
                  f"(GET {url}/v1/model says which endpoint); SIGINT or SIGTERM stops it", flush=True)
            stop.wait()
            print(f"[medvl serve] {stage.name}: {signal.Signals(stop.received).name}, shutting down", flush=True)
        finally:
            serve.shutdown()


def deploy(spec: JobSpec, checkpoint: str, api_key_digest: str, adapters: list[dict] | None = None) -> None:
    """Run the application on the Serve instance already started; returns once its replicas are up."""
    from ray import serve

    serve.run(application(spec, checkpoint, api_key_digest, adapters), name=spec.name, route_prefix="/")


def application(spec: JobSpec, checkpoint: str, api_key_digest: str, adapters: list[dict] | None = None):
    from medvl.serve.app import build_app

    return build_app(app_args(spec, checkpoint, api_key_digest, adapters))


def write_config(spec: JobSpec, last_train: str | None, path: Path) -> dict:
    """Write the Serve config file for ``serve deploy`` (no Ray started); returns the config."""
    adapters = resolve_adapters(spec)
    checkpoint = adapters[0]["folder"] if adapters else resolve_checkpoint(spec, last_train)
    config = serve_config(spec, checkpoint, api_key_digest(spec.serve), adapters)
    write_serve_config(config, path)
    return config


class StopSignals:
    """SIGINT and SIGTERM set an event instead of killing the process; the previous handlers come back on exit."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.received: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> StopSignals:
        for number in STOP_SIGNALS:
            self.previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame) -> None:
        self.received = number
        self.event.set()

    def wait(self) -> None:
        while not self.event.wait(0.5):  # polls, so the handler runs promptly on any platform
            pass
