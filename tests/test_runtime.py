"""Which Ray a job runs on, how long joining one may take, and how a run stops on SIGINT / SIGTERM.

The quick tests stand in for ``ray.init`` (no Ray starts); the slow ones run ``python -m medvl.cli run`` in a
subprocess whose TMPDIR is a folder of the test's own, so that Ray looks for `ray start`'s record there
(``<TMPDIR>/ray/ray_current_cluster``) and not in this shared machine's /tmp/ray.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from medvl.cli import main
from medvl.runtime import RayConnectError, Stopped, ray_session
from medvl.spec import JobSpec, SpecError, load_spec
from tests.ray_head import running_head
from tests.test_submit import TINY

REPO = Path(__file__).resolve().parents[1]
LOCAL_LINE = "[medvl] ray: started a local Ray in this process"


def quickstart(*overrides: str) -> JobSpec:
    return load_spec(REPO / "jobs/quickstart.yaml", list(overrides))


def with_sets(overrides: list[str]) -> list[str]:
    return [word for override in overrides for word in ("--set", override)]


# --------------------------------------------------------------------------------------------- no Ray


class FakeRay:
    """Records what ray_session asks of Ray; ``initialized`` flips like Ray's own."""

    def __init__(self) -> None:
        self.inits: list[dict] = []
        self.shutdowns = 0
        self.initialized = False

    def init(self, **kwargs) -> None:
        self.inits.append(kwargs)
        self.initialized = True

    def shutdown(self) -> None:
        self.shutdowns += 1
        self.initialized = False


@pytest.fixture
def fake_ray(monkeypatch):
    import ray

    fake = FakeRay()
    monkeypatch.setattr(ray, "is_initialized", lambda: fake.initialized)  # also when this session's ray_local runs
    monkeypatch.setattr(ray, "init", fake.init)
    monkeypatch.setattr(ray, "shutdown", fake.shutdown)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(REPO)
    return fake


@contextmanager
def listening(host: str) -> Iterator[str]:
    """A TCP port on ``host`` that accepts connections (the kernel's backlog) and never says a word."""
    with socket.socket() as server:
        server.bind((host, 0))
        server.listen(16)
        yield f"{host}:{server.getsockname()[1]}"


@contextmanager
def nothing_listening() -> Iterator[int]:
    """A port where nothing answers, on 127.0.0.1 and on the address Ray turns it into. Not a free ephemeral port:
    on a machine shared with other Rays, one of their gRPC servers was seen answering on a port just handed out
    (even one held bound by the test), so a low port that no Ray picks, checked silent first."""
    for port in (9, 19, 39, 47, 59, 71, 87, 97):
        if not any(answers(host, port) for host in ("127.0.0.1", node_ip())):
            yield port
            return
    pytest.skip("every candidate low port answers here")


def answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def node_ip() -> str:
    """The address Ray turns 127.0.0.1 into before it connects (and so the one that must answer)."""
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def test_local_mode_starts_a_fresh_ray_whatever_ray_start_recorded(fake_ray, monkeypatch, tmp_path):
    from ray._private.utils import read_ray_address

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:6379")  # a Ray long gone
    assert read_ray_address() is not None  # what a bare ray.init() would have joined
    with ray_session(quickstart("ray.num_cpus=2")):
        assert fake_ray.initialized
    assert fake_ray.inits == [{"address": "local", "num_cpus": 2, "log_to_driver": True}]
    assert fake_ray.shutdowns == 1

    monkeypatch.setenv("RAY_ADDRESS", "local")  # Ray's own word for the same
    with ray_session(quickstart()):
        pass
    assert fake_ray.inits[1] == {"address": "local", "log_to_driver": True}  # num_cpus 0: all cores


def test_a_named_address_is_joined_as_named_and_the_spec_wins(fake_ray, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with listening(node_ip()) as job_cluster, listening(node_ip()) as spec_cluster:
        monkeypatch.setenv("RAY_ADDRESS", job_cluster)  # what Ray gives a submitted job's driver
        with ray_session(quickstart("ray.num_cpus=2")):
            pass
        with ray_session(quickstart(f"ray.address={spec_cluster}")):
            pass
    # No num_cpus (Ray refuses it when joining), and the cluster's auth settings are left alone.
    assert fake_ray.inits == [{"address": job_cluster, "log_to_driver": True},
                              {"address": spec_cluster, "log_to_driver": True}]
    assert "RAY_AUTH_MODE" not in os.environ and fake_ray.shutdowns == 2


@pytest.mark.parametrize("origin", ["ray.address (spec)", "RAY_ADDRESS (environment)"])
def test_an_address_that_does_not_answer_fails_in_one_line_naming_it(fake_ray, monkeypatch, capsys, origin):
    with nothing_listening() as port:
        address = f"127.0.0.1:{port}"
        overrides = ["ray.connect_timeout_s=1"]
        if origin.startswith("RAY_ADDRESS"):
            monkeypatch.setenv("RAY_ADDRESS", address)
        else:
            overrides.append(f"ray.address={address}")
        assert main(["run", "jobs/quickstart.yaml", *with_sets(overrides)]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"error: {origin}: {address} did not answer within 1 s (ray.connect_timeout_s)"]
    assert fake_ray.inits == []


def test_connect_timeout_must_be_positive():
    with pytest.raises(SpecError, match=r"^ray.connect_timeout_s: expected a positive number, got 0$"):
        quickstart("ray.connect_timeout_s=0")
    assert quickstart().ray.connect_timeout_s == 60


def test_ctrl_c_while_joining_stops_with_130_and_puts_the_handlers_back(fake_ray, monkeypatch, capsys):
    import medvl.runtime

    waited = medvl.runtime._answers

    def ctrl_c_then_wait(*args):
        os.kill(os.getpid(), signal.SIGINT)
        return waited(*args)

    monkeypatch.setattr(medvl.runtime, "_answers", ctrl_c_then_wait)
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    with nothing_listening() as port:
        assert main(["run", "jobs/quickstart.yaml", "--set", f"ray.address=127.0.0.1:{port}"]) == 130
    assert "[medvl] stopped by SIGINT" in capsys.readouterr().err
    assert {number: signal.getsignal(number) for number in before} == before
    assert fake_ray.inits == []


def test_a_stop_signal_that_another_handler_took_still_stops_the_run(fake_ray):
    """Ray Train's SIGINT handler aborts the fit, then sys.exit(0); or swallows the signal once the fit is over."""
    with pytest.raises(Stopped) as stopped:
        with ray_session(quickstart()):
            signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
            os.kill(os.getpid(), signal.SIGINT)
    assert stopped.value.code == 130 and fake_ray.shutdowns == 1

    with pytest.raises(Stopped) as stopped:
        with ray_session(quickstart()) as stop_signals:
            signal.signal(signal.SIGTERM, lambda *_: None)
            os.kill(os.getpid(), signal.SIGTERM)
            stop_signals.rearm()  # run_stages, before the next stage
    assert stopped.value.code == 143 and fake_ray.shutdowns == 2

    with ray_session(quickstart()) as stop_signals:  # no signal: a stage's own handler is simply replaced
        signal.signal(signal.SIGINT, lambda *_: None)
        stop_signals.rearm()
        assert signal.getsignal(signal.SIGINT) == stop_signals._stop
    assert fake_ray.shutdowns == 3


def test_a_ray_the_caller_started_is_used_as_it_is(fake_ray):
    fake_ray.initialized = True
    with ray_session(quickstart("ray.address=10.0.0.5:6379")):
        pass
    assert fake_ray.inits == [] and fake_ray.shutdowns == 0


def test_auto_is_only_what_ray_start_recorded_and_names_it(fake_ray, monkeypatch, tmp_path):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    with pytest.raises(RayConnectError) as error:  # Ray's "auto" would take any GCS process it saw instead
        with ray_session(quickstart("ray.address=auto")):
            pass
    assert str(error.value) == ('ray.address (spec): "auto" found no Ray that `ray start` left on this machine '
                                f"(nothing recorded in {tmp_path}/ray/ray_current_cluster)")
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    with pytest.raises(RayConnectError, match=r'^RAY_ADDRESS \(environment\): "auto" found no Ray'):
        with ray_session(quickstart()):
            pass
    monkeypatch.delenv("RAY_ADDRESS")

    (tmp_path / "ray").mkdir()
    with nothing_listening() as port, pytest.raises(RayConnectError) as error:
        (tmp_path / "ray" / "ray_current_cluster").write_text(f"{node_ip()}:{port}")
        with ray_session(quickstart("ray.address=auto", "ray.connect_timeout_s=1")):
            pass
    assert str(error.value) == (f"ray.address (spec): auto → {node_ip()}:{port} did not answer within 1 s "
                                "(ray.connect_timeout_s)")


# --------------------------------------------------------------------------------------------- real runs


@contextmanager
def own_tmpdir() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="medvl-rt-", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def medvl_run(overrides: list[str], tmpdir: Path, **popen) -> subprocess.Popen:
    """``python -m medvl.cli run jobs/quickstart.yaml`` with TMPDIR=tmpdir and no RAY_ADDRESS, in its own session."""
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "medvl.cli", "run", "jobs/quickstart.yaml", *with_sets(overrides)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **popen)


def finish(process: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """Its exit code and output; killed (its whole session) and failed if it runs past ``timeout``."""
    try:
        output, _ = process.communicate(timeout=timeout)
        return process.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"still running after {timeout:g} s:\n{output[-3000:]}")


class Lines:
    """Reads a process's output in a thread, so that a test can wait for one line without blocking forever."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.process = process
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.lines.append("")  # end of output
            self.changed.notify_all()

    def wait_for(self, text: str, timeout: float) -> None:
        with self.changed:
            found = self.changed.wait_for(lambda: any(text in line for line in self.lines) or "" in self.lines,
                                          timeout=timeout)
        assert found and any(text in line for line in self.lines), f"no {text!r}:\n{self.text()[-3000:]}"

    def text(self) -> str:
        with self.changed:
            return "".join(self.lines)

    def rest(self, timeout: float) -> tuple[int, str]:
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            pytest.fail(f"still running {timeout:g} s after the signal:\n{self.text()[-3000:]}")
        with self.changed:
            self.changed.wait_for(lambda: "" in self.lines, timeout=10)
        return code, self.text()


def processes_under(root: Path) -> list:
    """Processes whose command line names ``root`` (a local Ray's raylet, GCS and workers name its session dir)."""
    import psutil

    return [process for process in psutil.process_iter(["cmdline"])
            if any(str(root) in part for part in process.info["cmdline"] or ())]


def left_running(root: Path) -> list:
    """Those still there after up to 15 s (Ray's shutdown waits for its processes; the kernel may lag a little)."""
    import psutil

    return psutil.wait_procs(processes_under(root), timeout=15)[1]


@pytest.mark.slow
def test_a_stale_ray_start_record_is_ignored_and_the_run_finishes_on_its_own_ray(tmp_path):
    with own_tmpdir() as root, nothing_listening() as port:
        (root / "ray").mkdir()
        (root / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")  # a `ray start` since stopped
        out_dir = tmp_path / "run"
        code, output = finish(medvl_run([*TINY, "stages=[prepare, train]", "train.max_steps=2",
                                         f"output_dir={out_dir}"], root), timeout=600)
        assert code == 0, output[-4000:]
        assert LOCAL_LINE in output and "Connecting to existing Ray cluster" not in output
        summary = json.loads((out_dir / "train" / "train_summary.json").read_text())
        assert summary["steps"] > 0
        assert not left_running(root)  # its Ray went with it


@pytest.mark.slow
def test_a_running_ray_start_is_joined_only_when_named():
    from ray.job_submission import JobSubmissionClient

    def drivers(head) -> list:
        return [job for job in JobSubmissionClient(head.dashboard).list_jobs() if job.type == "DRIVER"]

    prepare_only = [*TINY, "stages=[prepare]"]
    with running_head() as head, tempfile.TemporaryDirectory() as out:
        # TMPDIR=head.root: a bare ray.init() there would join this head (its ray_current_cluster).
        code, output = finish(medvl_run([*prepare_only, f"output_dir={out}/alone"], Path(head.root)), timeout=300)
        assert code == 0, output[-4000:]
        assert LOCAL_LINE in output and drivers(head) == []

        code, output = finish(medvl_run([*prepare_only, f"output_dir={out}/joined", "ray.address=auto"],
                                        Path(head.root)), timeout=300)
        assert code == 0, output[-4000:]
        assert "[medvl] ray: joined auto → " in output and LOCAL_LINE not in output
        assert len(drivers(head)) == 1


@pytest.mark.slow
@pytest.mark.parametrize("peer, signum, code", [
    ("nothing listens", signal.SIGTERM, 143),
    ("a silent listener", signal.SIGTERM, 143),  # the TCP check passes: ray.init itself is what waits
    ("a silent listener", signal.SIGINT, 130),
])
def test_a_signal_stops_a_run_stuck_joining(peer, signum, code):
    with own_tmpdir() as root, listening(node_ip()) as silent, nothing_listening() as port:
        address = silent if peer == "a silent listener" else f"127.0.0.1:{port}"
        lines = Lines(medvl_run(["ray.connect_timeout_s=600", f"ray.address={address}"], root))
        lines.wait_for("[medvl] ray: joining", timeout=120)
        if peer == "a silent listener":
            # Not a timing assertion: gives ray.init time to be inside Ray's GCS client, which ignores signals.
            lines.wait_for("Connecting to existing Ray cluster", timeout=60)
        os.kill(lines.process.pid, signum)
        exit_code, output = lines.rest(timeout=30)
        assert exit_code == code, output[-3000:]
        assert f"[medvl] stopped by {signal.Signals(signum).name}" in output


@pytest.mark.slow
def test_sigterm_during_a_stage_shuts_ray_down_and_exits_143(tmp_path):
    with own_tmpdir() as root:
        lines = Lines(medvl_run([*TINY, "stages=[prepare, train]", f"output_dir={tmp_path / 'run'}"], root))
        lines.wait_for("[medvl] stage train (train)", timeout=300)
        assert processes_under(root)  # its local Ray runs
        os.kill(lines.process.pid, signal.SIGTERM)
        exit_code, output = lines.rest(timeout=60)
        assert exit_code == 143, output[-3000:]
        assert "[medvl] stopped by SIGTERM" in output
        assert not left_running(root)
