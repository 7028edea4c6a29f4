"""The terminal shows medvl's own lines and progress; everything else a run prints goes to ``<output_dir>/medvl.log``.

A run's terminal used to be a wall of other tools' output: Ray's start-up lines and Data execution plans, a
transformers warning from every preprocessing actor, DeepSpeed's accelerator notice, Tune's status tables, and
whatever each Ray worker prints (Ray forwards worker output to the driver's ``sys.stdout`` / ``sys.stderr``).
For the length of a command, :func:`routed_output` replaces ``sys.stdout`` and ``sys.stderr`` with line routers:
a line of medvl's own (it carries ``[medvl``, also when a worker printed it), a ``warning:`` / ``error:`` line
of medvl's command line, or Ray's notice that it killed workers for lack of memory goes to the terminal and the
log; every other line goes to the log only. Logging handlers that write to the original streams are pointed at
the routers as well, and file descriptor 2 itself is routed the same way (Ray's C++ core and the Java scorers
write there directly, bypassing Python). Progress bars (:mod:`medvl.tracking.progress`) write to the terminal.

Trade-offs: the routing is by line, so a library that redraws a line with carriage returns lands in the log as
its last state. An exception that ends the command is printed after the streams are restored, so it always
reaches the terminal; a hard crash of the interpreter itself (a segfault's dump) would land in the log.
"""
from __future__ import annotations

import io
import logging
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, TextIO

MEDVL_MARK = "[medvl"
CLI_MESSAGE = ("warning: ", "error: ")  # medvl's own one-line messages (see medvl.cli)
WORTH_SEEING = ("killed due to memory pressure",)  # Ray's raylet: workers lost to OOM (a run slows or fails)
ANSI_STYLE = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the "(Worker pid=…)" prefixes it forwards
MAX_PENDING_CHARS = 65536  # a "line" that never ends (a redrawing bar) is flushed to the log at this size

_active: "_Routing | None" = None


def terminal() -> TextIO:
    """Where progress and medvl's own lines go: the real stdout while output is routed, else ``sys.stdout``."""
    return _active.stdout if _active is not None else sys.stdout


def is_terminal_line(line: str) -> bool:
    return MEDVL_MARK in line or line.startswith(CLI_MESSAGE) or any(text in line for text in WORTH_SEEING)


class _Router(io.TextIOBase):
    """A text stream that sends each complete line to the terminal and/or the log file."""

    def __init__(self, terminal_stream: TextIO, routing: "_Routing"):
        super().__init__()
        self._terminal, self._routing, self._pending = terminal_stream, routing, ""
        self._colours = _is_tty(terminal_stream)

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._terminal, "encoding", "utf-8") or "utf-8"

    def isatty(self) -> bool:
        return False  # libraries that redraw on a terminal print plain lines here

    def fileno(self) -> int:
        return self._terminal.fileno()  # faulthandler and subprocess ask; writes there bypass the routing

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._routing.lock:
            self._pending += text
            *lines, self._pending = self._pending.split("\n")
            for line in lines:
                self._route(line)
            if len(self._pending) > MAX_PENDING_CHARS:
                self._route(self._pending)
                self._pending = ""
        return len(text)

    def flush(self) -> None:
        with self._routing.lock:
            self._routing.flush_log()
            self._terminal.flush()

    def finish(self) -> None:
        if self._pending:
            self._route(self._pending)
            self._pending = ""

    def _route(self, line: str) -> None:
        line = line.rsplit("\r", 1)[-1]  # a redrawn line: keep what it last showed
        plain = ANSI_STYLE.sub("", line)
        self._routing.log(plain)
        if is_terminal_line(plain):
            _write_above_bars(self._terminal, (line if self._colours else plain) + "\n")


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _write_above_bars(stream: TextIO, text: str) -> None:
    """Write ``text`` to the terminal without tearing a progress bar that is being drawn there."""
    from tqdm import tqdm

    with tqdm.external_write_mode(file=stream, nolock=True):
        stream.write(text)
        stream.flush()


class _Fd2Capture:
    """File descriptor 2 redirected into a pipe whose lines a thread hands to a router.

    ``terminal`` writes where fd 2 pointed before (a router must not write terminal lines into its own pipe).
    """

    def __init__(self) -> None:
        sys.stderr.flush()
        self.saved = os.dup(2)
        self.terminal = os.fdopen(os.dup(self.saved), "w", encoding="utf-8", errors="replace", buffering=1)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self._read = read_end
        self._thread: threading.Thread | None = None

    def pump_into(self, router: _Router) -> None:
        def pump() -> None:
            import codecs

            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            try:
                while chunk := os.read(self._read, 65536):
                    router.write(decoder.decode(chunk))
            except (OSError, ValueError):  # the router closed under a lingering child's late output
                pass
            finally:
                os.close(self._read)

        self._thread = threading.Thread(target=pump, name="medvl-fd2", daemon=True)
        self._thread.start()

    def restore(self) -> None:
        os.dup2(self.saved, 2)  # the pipe's last writer goes (unless a child process still holds it)
        os.close(self.saved)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.terminal.close()


def _writes_to_fd2(stream: TextIO) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False


class _Routing:
    def __init__(self, log_path: Path):
        self.stdout, self.stderr = sys.stdout, sys.stderr
        self.lock = threading.RLock()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "a", encoding="utf-8", errors="replace", buffering=1)  # a line is there at once
        self._log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
        self._fd2 = _start_fd2_capture()
        direct = self._fd2 is not None and _writes_to_fd2(self.stderr)
        self.out_router = _Router(self.stdout, self)
        self.err_router = _Router(self._fd2.terminal if direct else self.stderr, self)
        if self._fd2 is not None:
            self._fd2.pump_into(self.err_router)

    def log(self, line: str) -> None:
        if not self._log.closed:
            self._log.write(line + "\n")

    def flush_log(self) -> None:
        if not self._log.closed:
            self._log.flush()

    def close(self) -> None:
        if self._fd2 is not None:
            self._fd2.restore()
        with self.lock:
            self.out_router.finish()
            self.err_router.finish()
            self._log.close()


def _start_fd2_capture() -> _Fd2Capture | None:
    try:
        return _Fd2Capture()
    except OSError:  # no usable descriptor 2 (a closed stderr): Python-level routing only
        return None


def _stream_handlers() -> Iterator[logging.StreamHandler]:
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                yield handler


def _repoint_handlers(mapping: dict[int, TextIO]) -> None:
    for handler in _stream_handlers():
        target = mapping.get(id(handler.stream))
        if target is not None:
            handler.setStream(target)


@contextmanager
def routed_output(log_path: Path) -> Iterator[Path]:
    """Route this process's output as the module docstring says, for the length of the ``with`` block.

    Nested use (a command that runs another) keeps the outer routing.
    """
    global _active
    if _active is not None:
        yield log_path
        return
    routing = _Routing(log_path)
    _active = routing
    sys.stdout, sys.stderr = routing.out_router, routing.err_router
    _repoint_handlers({id(routing.stdout): routing.out_router, id(routing.stderr): routing.err_router})
    try:
        yield log_path
    finally:
        sys.stdout.flush()
        sys.stdout, sys.stderr = routing.stdout, routing.stderr
        # Handlers created during the run (Ray configures some lazily) may point at a router too.
        _repoint_handlers({id(routing.out_router): routing.stdout, id(routing.err_router): routing.stderr})
        routing.close()
        _active = None
