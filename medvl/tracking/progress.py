"""Live progress a person can read: a tqdm bar on a terminal, one plain line per interval anywhere else.

Prepare (rows/s, skips, ETA), train (step / planned steps, epoch, loss, samples/s, ETA), eval (generated /
total) and a search (trials running / stopped / finished, best metric) each draw one :class:`Progress` on the
driver. When stdout is not a terminal (CI, ``medvl submit`` logs, ``> file``) nothing is redrawn: a line is
printed when ``tracking.progress_every_s`` has passed and when the stage ends, so a piped log holds no carriage
returns.

Training runs in Ray workers, so its progress travels: rank 0 posts what it measured to a
:class:`ProgressBoard` actor, and a :class:`BoardWatcher` thread on the driver takes the posts every second,
draws them and hands them to the run's metric log (:mod:`medvl.tracking.mlflow_store`).
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Any, Callable, TextIO

from medvl.tracking.console import terminal

POLL_S = 1.0


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def format_fields(fields: dict[str, Any]) -> str:
    parts = []
    for key, value in fields.items():
        if value is None:
            continue
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(f"{key} {text}")
    return ", ".join(parts)


class Progress:
    """One stage's progress: ``update(n, **fields)`` with the position and what to show beside it."""

    def __init__(self, label: str, total: int | None = None, unit: str = "it", every_s: float = 30.0,
                 stream: TextIO | None = None):
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.stream = stream or terminal()
        self.n, self.fields = 0, {}
        self.started = self._last_line = time.monotonic()
        self._last_shown: tuple | None = None
        self._bar = None
        self._closed = False
        if _is_tty(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=f"[medvl {label}]", unit=unit, file=self.stream, dynamic_ncols=True,
                             mininterval=0.5, leave=True)

    def update(self, n: int, **fields: Any) -> None:
        self.n = n
        self.fields.update(fields)
        if self._bar is not None:
            self._bar.set_postfix_str(format_fields(self.fields), refresh=False)
            self._bar.update(n - self._bar.n)
        elif time.monotonic() - self._last_line >= self.every_s:
            self._print_line()

    def note(self, message: str) -> None:
        """A line worth keeping (a validation result): printed above the bar, or as it is."""
        text = f"[medvl {self.label}] {message}"
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self._last_shown != self._state():
            self._print_line()

    def line(self) -> str:
        """The plain progress line: position, share of the total, fields, elapsed and ETA."""
        elapsed = time.monotonic() - self.started
        position = f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"
        if self.total:
            position += f" ({100 * self.n / self.total:.0f}%)"
        timing = f"{format_duration(elapsed)} elapsed"
        if self.total and 0 < self.n < self.total:
            timing += f", ETA {format_duration(elapsed / self.n * (self.total - self.n))}"
        fields = format_fields(self.fields)
        return f"[medvl {self.label}] {position}" + (f", {fields}" if fields else "") + f", {timing}"

    def _state(self) -> tuple:
        return self.n, tuple(self.fields.items())

    def _print_line(self) -> None:
        self._last_line, self._last_shown = time.monotonic(), self._state()
        self.stream.write(self.line() + "\n")
        self.stream.flush()


def stage_label(kind: str, name: str) -> str:
    """``train`` for a stage named after its kind, ``train decoder`` otherwise."""
    return kind if name == kind else f"{kind} {name}"


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class ProgressBoard:
    """A Ray actor (``ray.remote(num_cpus=0)``) where a worker posts what it measured; the driver takes it."""

    def __init__(self) -> None:
        self._posts: list[dict] = []

    def post(self, item: dict) -> None:
        self._posts.append(item)

    def take(self) -> list[dict]:
        posts, self._posts = self._posts, []
        return posts


def start_board():
    """A new board actor: no CPU, so it never competes with workers or Ray Data for a slot."""
    import ray

    return ray.remote(num_cpus=0)(ProgressBoard).remote()


class BoardWatcher:
    """A driver thread that takes a board's posts every second and hands them to ``handle``."""

    def __init__(self, board, handle: Callable[[list[dict]], None]):
        self.board, self.handle = board, handle
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="medvl-progress", daemon=True)

    def __enter__(self) -> BoardWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._drain()  # what the workers posted last

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            self._drain()

    def _drain(self) -> None:
        import ray

        try:
            posts = ray.get(self.board.take.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - progress must never fail a run; the board may be gone at shutdown
            return
        if posts:
            try:
                self.handle(posts)
            except Exception as exc:  # noqa: BLE001 - shown, never allowed to stop the watcher
                print(f"[medvl progress] could not show or log a worker's report: {exc!r}", file=sys.stderr)
