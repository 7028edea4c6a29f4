"""A real Ray head on loopback for tests (`ray start --head --block`), the test's own: stopped by signalling its
processes, never `ray stop`, which would stop every other Ray on a shared machine.

The head's temp dir is ``<root>/ray``, where ``root`` is a fresh short folder under /tmp (Ray's socket paths live
under it). `ray start` records the head's address in ``<root>/ray/ray_current_cluster``; a process whose TMPDIR is
``root`` looks for that record there, as a process with the default TMPDIR looks in /tmp/ray.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Head:
    dashboard: str  # http://127.0.0.1:P, the Jobs API
    gcs_address: str  # 127.0.0.1:P, what ray.init joins
    root: str  # TMPDIR under which Ray finds this head's ray_current_cluster


def ray_start_command(temp_dir: str, dashboard_port: int, gcs_port: int) -> list[str]:
    ray = Path(sys.executable).with_name("ray")
    ports = {name: free_port() for name in ("ray-client-server-port", "dashboard-agent-listen-port",
                                            "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                            "metrics-export-port", "node-manager-port", "object-manager-port")}
    # Every port chosen free: another Ray on this machine keeps its defaults (10001, 52365…).
    return [str(ray) if ray.exists() else "ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
            "--dashboard-host", "127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
            "--num-cpus", "2", "--temp-dir", temp_dir, "--disable-usage-stats", f"--port={gcs_port}",
            *(f"--{name}={port}" for name, port in ports.items())]


@contextmanager
def running_head() -> Iterator[Head]:
    """Start a head, wait until its Jobs API answers (up to 300 s), yield it, then end all it started."""
    from ray.job_submission import JobSubmissionClient

    root = tempfile.mkdtemp(prefix="medvl-rh-", dir="/tmp")  # short: Ray's socket paths live under it
    dashboard_port, gcs_port = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "240",  # 60 s by default: too short on a loaded 2-CPU machine
           # A job's entrypoint says `python`: the one of this environment, as on a cluster node's PATH.
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    log_path = Path(root) / "ray-start.log"
    with open(log_path, "w") as log:
        head = subprocess.Popen(ray_start_command(f"{root}/ray", dashboard_port, gcs_port), env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    # `ray start` writes its record last, seconds after the Jobs API first answers: until then a bare ray.init()
    # could not find this head, and "auto" would take any Ray running on the machine.
    record = Path(root) / "ray" / "ray_current_cluster"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert head.poll() is None, f"ray start exited: {log_path.read_text()[-3000:]}"
            try:
                JobSubmissionClient(address).list_jobs()
                if record.exists():
                    break
            except (OSError, RuntimeError):  # ConnectionError until the dashboard and its job agent are up
                pass
            assert time.monotonic() < deadline, f"no head after 300 s: {log_path.read_text()[-3000:]}"
            time.sleep(1)
        yield Head(dashboard=address, gcs_address=f"127.0.0.1:{gcs_port}", root=root)
    finally:
        stop_ray_start(head, wait_s=5)  # ~30 s more on a raylet that drains its workers: not worth CI's time
        shutil.rmtree(root, ignore_errors=True)


def stop_ray_start(process: subprocess.Popen, wait_s: float = 10) -> None:
    """End a `ray start --block` node: SIGTERM (it stops what it started), then its whole process group and every
    process it started (some actors, Ray Data's, leave its process group)."""
    import psutil

    family = psutil.Process(process.pid).children(recursive=True) if process.poll() is None else []
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in family:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait()
    psutil.wait_procs(family, timeout=10)
