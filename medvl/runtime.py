"""Start or join Ray for a job, and stop promptly when told.

Which Ray. Local mode (no ``ray.address``, no ``RAY_ADDRESS``) always starts a fresh Ray inside this process,
``ray.init(address="local")``. A bare ``ray.init()`` would instead join whatever `ray start` last recorded in
``<tmp>/ray/ray_current_cluster``: another cluster's resources and settings while it runs, minutes of retrying a dead
GCS once it has stopped. A running cluster is joined only when named: by ``ray.address`` in the spec, or by
``RAY_ADDRESS`` (which Ray sets for a submitted job's driver); ``auto`` is the Ray that `ray start` left here.

Joining is bounded by ``ray.connect_timeout_s``. First the address must accept a TCP connection, polled from the main
thread so that a signal interrupts it; then ``ray.init`` runs in a helper thread that the main thread waits on. Ray's
GCS client holds its calling thread in C++ for ~40 s per attempt (20 attempts), and a main thread held there runs no
Python signal handler: that is how a join to a dead address came to ignore SIGTERM. A helper thread still connecting
at the deadline is abandoned (a daemon); should its ``ray.init`` succeed later, it disconnects at once.

Signals. While the session runs, SIGINT and SIGTERM raise :class:`Stopped`, a ``SystemExit`` of 130 / 143 (so the
``except Exception`` of library code does not swallow it), and Ray is shut down on the way out. Ray replaces these
handlers in places: ``ray.init`` installs ``sys.exit(15)`` for SIGTERM, and a Ray Train fit installs a SIGINT handler
that aborts the run gracefully, ends in ``sys.exit(0)`` and stays installed after the fit. Hence a wakeup fd that
records every signal whichever handler took it: an exception leaving the session after a stop signal becomes
``Stopped``, and :meth:`StopSignals.rearm`, called before each stage, stops the run if a signal was swallowed and
otherwise puts these handlers back. A stage that ends normally on a signal (serve) keeps its exit code 0.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from medvl.spec import JobSpec

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(SystemExit):
    """SIGINT or SIGTERM stopped the run; the exit code is 128 + the signal's number (130, 143)."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


class RayConnectError(ConnectionError):
    """The Ray named by ``ray.address`` or ``RAY_ADDRESS`` could not be joined; the message is one line naming it."""


@dataclass(frozen=True)
class RayTarget:
    address: str  # "local", or the address to join as it was given
    origin: str  # "ray.address (spec)" or "RAY_ADDRESS (environment)"; "" when local

    @property
    def local(self) -> bool:
        return self.address == "local"


def ray_target(spec: JobSpec) -> RayTarget:
    """The spec's address wins over the environment's; neither means a local Ray of this process's own."""
    if spec.ray.address:
        return RayTarget(spec.ray.address, "ray.address (spec)")
    if os.environ.get("RAY_ADDRESS"):
        return RayTarget(os.environ["RAY_ADDRESS"], "RAY_ADDRESS (environment)")
    return RayTarget("local", "")


@contextmanager
def ray_session(spec: JobSpec) -> Iterator[StopSignals]:
    import ray

    if ray.is_initialized():  # a caller (a test, a notebook) already runs Ray: use it, and its signal handling, as is
        yield StopSignals(active=False)
        return
    target = ray_target(spec)
    with StopSignals() as stop:
        try:
            if target.local:
                _start_local(spec)
            else:
                _join(target, spec.ray.connect_timeout_s)
            stop.rearm()  # ray.init replaced the SIGTERM handler
            # Ray Data's progress bars interleave badly with our own progress lines on a terminal, and redraw with
            # carriage returns in medvl.log; medvl draws the counts that matter (rows read, steps, generated).
            ray.data.DataContext.get_current().enable_progress_bars = False
            yield stop
        except BaseException as exc:
            signum = stop.received()
            if signum is not None and not isinstance(exc, Stopped):
                raise Stopped(signum) from exc  # e.g. ray.init's sys.exit(15), Ray Train's sys.exit(0) after SIGINT
            raise
        finally:
            if ray.is_initialized():
                ray.shutdown()


def _start_local(spec: JobSpec) -> None:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a Ray of our own needs no token auth
    # Train V2 tees each print of a worker into its logger too, so every line reached the driver twice. Off for our
    # own Ray (its workers inherit this environment); medvl's workers report through a progress board anyway.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # Train V2 starts a preemption-watcher actor with every run (each Tune trial): one more process to start before
    # the first step, and on this machine's own Ray no node is ever drained. Clusters (joined Rays) keep it.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    kwargs: dict[str, Any] = {"address": "local", "log_to_driver": True}
    if spec.ray.num_cpus:
        kwargs["num_cpus"] = spec.ray.num_cpus
    ray.init(**kwargs)
    cpus = ray.cluster_resources().get("CPU", 0)
    print(f"[medvl] ray: started a local Ray in this process ({cpus:g} CPUs)", flush=True)


def _join(target: RayTarget, timeout_s: float) -> None:
    """Join the named Ray (its settings, RAY_AUTH_MODE and tokens, left alone), or fail within ``timeout_s``."""
    import ray

    deadline = time.monotonic() + timeout_s
    host, port, shown = _endpoint(target)
    # Ray resolves "auto" again inside ray.init, and then prefers a lone running GCS over ray start's record:
    # hand it the address checked here instead.
    address = target.address if "://" in target.address else f"{host}:{port}"
    print(f"[medvl] ray: joining {shown} from {target.origin}, waiting up to {timeout_s:g} s", flush=True)
    named = f"{target.origin}: {shown}"
    silent = RayConnectError(f"{named} did not answer within {timeout_s:g} s (ray.connect_timeout_s)")
    if not _answers(host, port, deadline):
        raise silent
    try:  # num_cpus is not passed: Ray refuses it when joining
        _init_in_thread(deadline, silent, address=address, log_to_driver=True)
    except Exception as exc:  # Ray's own refusal (auth, version mismatch, its retries spent): its first line
        if isinstance(exc, RayConnectError):
            raise
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RayConnectError(f"{named} could not be joined: {first_line}") from exc
    cpus = ray.cluster_resources().get("CPU", 0)
    print(f"[medvl] ray: joined {shown} ({cpus:g} CPUs)", flush=True)


def _endpoint(target: RayTarget) -> tuple[str, int, str]:
    """Host and port that must answer for ``target``, and the address as messages show it."""
    from ray._private import services
    from ray._private.utils import get_ray_address_file

    address = target.address
    nothing_recorded = RayConnectError(f'{target.origin}: "auto" found no Ray that `ray start` left on this machine '
                                       f"(nothing recorded in {get_ray_address_file(None)})")
    if "://" in address:  # Ray Client (ray://host:port): Ray resolves nothing, neither do we
        bootstrap, shown = address.split("://", 1)[1].rstrip("/"), address
    else:
        # Ray's own "auto" takes a lone running GCS process over ray start's record, and any GCS without a record:
        # on a shared machine, someone else's. Here "auto" is RAY_ADDRESS when it names one, else the record.
        names_one = os.environ.get("RAY_ADDRESS", "") not in ("", "auto")
        if address == "auto" and not names_one:
            address = services.find_bootstrap_address(None)
            if address is None:
                raise nothing_recorded
        try:
            bootstrap = services.canonicalize_bootstrap_address(address)
        except ConnectionError:
            raise nothing_recorded from None
        except ValueError:
            raise RayConnectError(f'{target.origin}: expected host:port, auto or ray://host:port, got "{address}"'
                                  ) from None
        shown = f"auto → {bootstrap}" if target.address == "auto" else address
    host, _, port = bootstrap.rpartition(":")
    if not host or not port.isdigit():
        raise RayConnectError(f'{target.origin}: expected host:port, auto or ray://host:port, got "{address}"')
    return host.strip("[]"), int(port), shown


def _answers(host: str, port: int, deadline: float) -> bool:
    """Whether ``host:port`` accepts a TCP connection before ``deadline`` (a head may still be starting)."""
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, remaining)):
                return True
        except OSError:
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    return False


def _init_in_thread(deadline: float, timeout_error: RayConnectError, **kwargs: Any) -> None:
    """``ray.init(**kwargs)`` in a helper thread, so that the main thread can give up and still handle signals."""
    import ray

    done, abandoned = threading.Event(), threading.Event()
    failure: list[BaseException] = []

    def connect() -> None:
        try:
            with _quiet_thread_warning():
                ray.init(**kwargs)
            if abandoned.is_set():  # the main thread gave up while this connected: let nothing stay attached
                ray.shutdown()
        except BaseException as exc:  # handed to the main thread
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=connect, name="medvl-ray-connect", daemon=True).start()
    try:
        while not done.wait(timeout=min(0.5, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise timeout_error
    except BaseException:
        abandoned.set()
        raise
    if failure:
        raise failure[0]


@contextmanager
def _quiet_thread_warning() -> Iterator[None]:
    """ray.init off the main thread warns that it set no SIGTERM handler: on purpose here, ours is in place."""
    worker_log = logging.getLogger("ray._private.worker")
    only_that = _DropMessage("SIGTERM handler is not set")
    worker_log.addFilter(only_that)
    try:
        yield
    finally:
        worker_log.removeFilter(only_that)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


class StopSignals:
    """While active: SIGINT and SIGTERM raise :class:`Stopped`, and every stop signal is recorded, whichever handler
    took it (a wakeup fd written by the interpreter itself before any Python handler runs)."""

    def __init__(self, active: bool = True) -> None:
        # Handlers can only be set from the main thread; elsewhere this does nothing.
        self.active = active and threading.current_thread() is threading.main_thread()
        self.first: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if self.active:
            self._reader, self._writer = socket.socketpair()
            self._reader.setblocking(False)
            self._writer.setblocking(False)
            self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
            self._previous = {number: signal.getsignal(number) for number in STOP_SIGNALS}
            self.rearm()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.active:
            for number, handler in self._previous.items():
                signal.signal(number, handler)
            signal.set_wakeup_fd(self._previous_fd)
            self._reader.close()
            self._writer.close()

    def rearm(self) -> None:
        """Raise :class:`Stopped` if a stop signal arrived since (another handler took it and carried on);
        otherwise put this object's handlers back in place of any a library installed (Ray Train leaves one)."""
        if not self.active:
            return
        if self.received() is not None:
            raise Stopped(self.first)
        for number in STOP_SIGNALS:
            signal.signal(number, self._stop)

    def received(self) -> int | None:
        """The first stop signal this process received while active, if any."""
        if self.active:
            try:
                while chunk := self._reader.recv(512):
                    for number in chunk:
                        if number in STOP_SIGNALS and self.first is None:
                            self.first = number
            except OSError:  # BlockingIOError: nothing more to read
                pass
        return self.first

    def _stop(self, number: int, frame: object) -> None:
        self.first = self.first or number
        for other in STOP_SIGNALS:  # a second signal while Ray shuts down ends the process at once
            signal.signal(other, signal.SIG_DFL)
        raise Stopped(number)
