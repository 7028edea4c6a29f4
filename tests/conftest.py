"""Shared fixtures: one local Ray for the whole session (starting Ray costs seconds), tiny synthetic data."""
from __future__ import annotations

import os
import socket
import tempfile

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that tries to download fails fast instead of hanging
# Model folders fetched from S3 (medvl.models.cache) go to a temporary folder, set before Ray starts so that its
# workers inherit it, never to the user's ~/.cache.
os.environ.setdefault("MEDVL_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"medvl-test-models-{os.getuid()}"))


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False)  # never a `ray start` Ray
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture
def one_thread():
    """Two threads on a shared 2-core machine spin against each other; one is faster and deterministic."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_endpoint(monkeypatch):
    """A real S3 API (moto's server) on loopback, with dummy keys in this process's environment only."""
    from moto.server import ThreadedMotoServer

    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
