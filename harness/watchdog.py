"""The hang watchdog: a wall-clock limit and a silence limit on a command.

A session hangs when it runs longer than its wall-clock limit
(``diag_on_hang``, ``harness exec --timeout``) or prints nothing for longer
than its silence limit (``diag_silence``, ``--silence``). `Watchdog.run`
waits for the command and returns a `HangEvent` when a limit is hit; it never
kills anything itself, so the caller can capture stacks first and reap after.

Seeing silence means seeing the output. With a silence limit the command's
stdout and stderr go through an `OutputPump`, which copies every byte to the
real stdout and stderr and notes when the last one arrived. Without one, the
command inherits the harness's stdio untouched and nothing is pumped.

Each stream gets a pseudo-terminal when the real stream is a terminal, and a
pipe when it is not (``output="auto"``). That keeps what the command sees
unchanged: at a terminal it still finds a tty (colours, line-buffered output,
terminal width), and in CI, where stdout is a pipe or a file, it still finds
a pipe. A program that block-buffers its output on a pipe (Python without
``-u`` or ``PYTHONUNBUFFERED=1``, C stdio) prints in bursts there, so a
silence limit must be longer than its quiet stretches, or the stream forced
to a pty with ``output="pty"``. pytest writes its progress as it goes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import selectors
import struct
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from harness.errors import HarnessError
from harness.rtvars import RuntimeVars

log = logging.getLogger("harness.watchdog")

OutputMode = Literal["auto", "pty", "pipe"]
LimitKind = Literal["timeout", "silence"]


class _Waitable(Protocol):
    """What `Watchdog.run` needs of a process: `subprocess.Popen` fits."""

    pid: int

    def poll(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class HangEvent:
    """A limit was hit: which one, and when."""

    kind: LimitKind
    """``"timeout"``: the wall-clock limit; ``"silence"``: no output."""
    limit: float
    """The limit that was hit, in seconds."""
    elapsed: float
    """Seconds from the start of the watch to the detection."""
    silent_for: float | None
    """Seconds since the last byte of output; ``None`` when not pumped."""
    started_at: float
    """Wall-clock time (`time.time`) the watch started."""
    detected_at: float
    """Wall-clock time the limit was found hit."""
    pid: int
    """The watched process."""

    def describe(self) -> str:
        """One line for a report, e.g. ``silence: no output for 2.0 s ...``."""
        if self.kind == "silence":
            return (
                f"silence: no output for {self.silent_for or self.limit:.1f} s "
                f"(limit {self.limit:g} s, --silence / diag_silence)"
            )
        return (
            f"timeout: still running after {self.elapsed:.1f} s "
            f"(limit {self.limit:g} s, --timeout / diag_on_hang)"
        )


class OutputPump:
    """Carry a command's stdout and stderr to ours, noting the last byte's time.

    Use: `open` before spawning, pass `popen_kwargs` to `subprocess.Popen`,
    `start` right after spawning (it closes the command's ends in this
    process, so the end of output can be seen), `close` when done. The copy
    runs in a daemon thread, so output keeps flowing while the caller waits,
    captures stacks or reaps.
    """

    def __init__(
        self, output: OutputMode = "auto", *, stdout_fd: int = 1, stderr_fd: int = 2
    ) -> None:
        if output not in ("auto", "pty", "pipe"):
            msg = f"output mode {output!r} is not one of 'auto', 'pty', 'pipe'"
            raise HarnessError(msg)
        self.output = output
        self._dests = (stdout_fd, stderr_fd)
        self._child_ends: list[int] = []
        self._our_ends: list[int] = []
        self._kinds: list[str] = []
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1
        self._stop_at: float | None = None
        self.last_output = time.monotonic()
        """`time.monotonic` of the last byte read (or of `open`)."""
        self.bytes_copied = 0

    @property
    def kinds(self) -> tuple[str, ...]:
        """``("pty"|"pipe", ...)`` for stdout and stderr, once open."""
        return tuple(self._kinds)

    def open(self) -> None:
        """Create the pty or pipe for each stream."""
        for dest in self._dests:
            use_pty = self.output == "pty" or (self.output == "auto" and _isatty(dest))
            if use_pty:
                ours, theirs = os.openpty()
                _prepare_pty(theirs, like=dest)
                kind = "pty"
            else:
                ours, theirs = os.pipe()
                kind = "pipe"
            self._our_ends.append(ours)
            self._child_ends.append(theirs)
            self._kinds.append(kind)
        self.last_output = time.monotonic()
        log.debug("Output pump opened: stdout %s, stderr %s.", *self._kinds)

    def popen_kwargs(self) -> dict[str, Any]:
        """``stdout=`` and ``stderr=`` for `subprocess.Popen`."""
        if not self._child_ends:
            msg = "OutputPump.popen_kwargs() needs open() first"
            raise RuntimeError(msg)
        return {"stdout": self._child_ends[0], "stderr": self._child_ends[1]}

    def start(self) -> None:
        """Close the command's ends here and start copying."""
        for fd in self._child_ends:
            os.close(fd)
        self._child_ends = []
        self._wake_r, self._wake_w = os.pipe()
        self.last_output = time.monotonic()
        self._thread = threading.Thread(
            target=self._copy, name="harness-output-pump", daemon=True
        )
        self._thread.start()

    def close(self, drain: float = 1.0) -> None:
        """Stop copying once the output ends, or after *drain* seconds.

        A process left behind (a leaked daemon) can hold the stream open
        forever: after *drain* seconds the pump stops anyway, and that
        process's later writes fail (``EIO`` on a pty, ``EPIPE`` on a pipe).
        """
        for fd in self._child_ends:
            os.close(fd)
        self._child_ends = []
        if self._thread is not None:
            self._stop_at = time.monotonic() + drain
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
            self._thread.join(drain + 1.0)
            self._thread = None
        for fd in (*self._our_ends, self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._our_ends = []
        self._wake_r = self._wake_w = -1

    def __enter__(self) -> OutputPump:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _copy(self) -> None:
        selector = selectors.DefaultSelector()
        for ours, dest in zip(self._our_ends, self._dests, strict=True):
            selector.register(ours, selectors.EVENT_READ, dest)
        selector.register(self._wake_r, selectors.EVENT_READ, None)
        dead_dests: set[int] = set()
        open_streams = len(self._our_ends)
        try:
            while open_streams:
                stop_at = self._stop_at
                if stop_at is not None:
                    # Stopping: keep reading what is already there, but do
                    # not wait for a writer that never closes.
                    wait = max(0.0, min(0.1, stop_at - time.monotonic()))
                else:
                    wait = None
                events = selector.select(wait)
                if not events and stop_at is not None:
                    break
                for key, _ in events:
                    if key.data is None:
                        with contextlib.suppress(OSError):
                            os.read(self._wake_r, 64)
                        continue
                    try:
                        data = os.read(key.fd, 65536)
                    except OSError as exc:
                        # A pty reports the end of output as EIO once every
                        # process holding it has closed it.
                        if exc.errno != errno.EIO:
                            log.debug("Output pump read failed: %s.", exc)
                        data = b""
                    if not data:
                        selector.unregister(key.fd)
                        open_streams -= 1
                        continue
                    self.last_output = time.monotonic()
                    self.bytes_copied += len(data)
                    if key.data not in dead_dests and not _write_all(key.data, data):
                        # Our own stdout is gone (`| head`): keep draining so
                        # the command never blocks on a full pipe.
                        dead_dests.add(key.data)
        finally:
            selector.close()


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _prepare_pty(fd: int, *, like: int) -> None:
    """Pass bytes through unchanged and take the real terminal's size."""
    attrs = termios.tcgetattr(fd)
    # Without ONLCR the pty leaves "\n" alone; the real terminal (if any)
    # does its own translation, and a log file gets no stray "\r".
    attrs[1] &= ~termios.ONLCR
    termios.tcsetattr(fd, termios.TCSANOW, attrs)
    if _isatty(like):
        with contextlib.suppress(OSError):
            size = fcntl.ioctl(
                like, termios.TIOCGWINSZ, struct.pack("HHHH", 0, 0, 0, 0)
            )
            fcntl.ioctl(fd, termios.TIOCSWINSZ, size)


def _write_all(fd: int, data: bytes) -> bool:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except InterruptedError:
            continue
        except OSError:
            return False
        view = view[written:]
    return True


class Watchdog:
    """Watch a command against a wall-clock limit and a silence limit.

    ::

        with Watchdog(timeout=600, silence=120) as dog:
            proc = subprocess.Popen(cmd, **dog.popen_kwargs())
            hang = dog.run(proc)
        if hang is not None:
            ...  # capture stacks (hang_report), reap, exit HUNG

    `popen_kwargs` is empty without a silence limit: the command then
    inherits stdio. Leaving the ``with`` block stops the output pump after
    the output ends (at most *drain* seconds later); keep the block open
    while capturing and reaping, so output keeps flowing meanwhile.
    """

    def __init__(
        self,
        timeout: float | None = None,
        silence: float | None = None,
        *,
        output: OutputMode = "auto",
        stdout_fd: int = 1,
        stderr_fd: int = 2,
        poll_interval: float = 0.1,
        drain: float = 1.0,
    ) -> None:
        for name, value in (("timeout", timeout), ("silence", silence)):
            if value is not None and not value > 0:
                msg = (
                    f"the {name} limit must be a positive number of seconds, "
                    f"got {value!r}; leave it out for no limit"
                )
                raise HarnessError(msg)
        self.timeout = timeout
        self.silence = silence
        self.poll_interval = poll_interval
        self.drain = drain
        self.pump: OutputPump | None = (
            OutputPump(output, stdout_fd=stdout_fd, stderr_fd=stderr_fd)
            if silence is not None
            else None
        )
        self._opened = False
        self._stop = threading.Event()

    @classmethod
    def from_rtvars(cls, rtvars: RuntimeVars, **kwargs: Any) -> Watchdog:
        """A watchdog with the envelope's ``diag_on_hang`` and ``diag_silence``."""
        return cls(timeout=rtvars.diag_on_hang, silence=rtvars.diag_silence, **kwargs)

    @property
    def enabled(self) -> bool:
        """Whether any limit is set (without one, `run` just waits)."""
        return self.timeout is not None or self.silence is not None

    def open(self) -> None:
        """Prepare the output pump, if any; call before spawning."""
        if self.pump is not None and not self._opened:
            self.pump.open()
        self._opened = True

    def popen_kwargs(self) -> dict[str, Any]:
        """``stdout=`` / ``stderr=`` for `subprocess.Popen`; empty when unpumped."""
        if self.pump is None:
            return {}
        self.open()
        return self.pump.popen_kwargs()

    def run(self, proc: _Waitable) -> HangEvent | None:
        """Wait for *proc* to exit; return a `HangEvent` if a limit comes first.

        The clocks start now: call right after spawning. Returns ``None``
        when the process exits within its limits (its status is then
        ``proc.returncode``), or when `start`'s stop function is called.
        Nothing is killed either way. A process is seen to exit within
        *poll_interval* seconds.
        """
        if self.pump is not None:
            self.open()
            self.pump.start()
        start = time.monotonic()
        started_at = time.time()
        log.debug(
            "Watching process %s (timeout %s, silence %s).",
            proc.pid,
            self.timeout,
            self.silence,
        )
        while True:
            now = time.monotonic()
            waits = [self.poll_interval]
            if self.timeout is not None:
                left = self.timeout - (now - start)
                if left <= 0:
                    return self._event("timeout", self.timeout, start, started_at, proc)
                waits.append(left)
            if self.pump is not None and self.silence is not None:
                quiet = now - self.pump.last_output
                if quiet >= self.silence:
                    return self._event("silence", self.silence, start, started_at, proc)
                waits.append(self.silence - quiet)
            if self._stop.wait(max(0.01, min(waits))) or proc.poll() is not None:
                return None

    def start(
        self, proc: _Waitable, on_hang: Callable[[HangEvent], None]
    ) -> Callable[[], None]:
        """Watch *proc* in a daemon thread; return a function that stops it.

        When a limit is hit, ``on_hang(event)`` runs in that thread: capture
        the stacks and reap there, and the caller's own wait on *proc* ends
        when the reap kills it. The returned stop function ends the watch
        (waiting for a running *on_hang* to finish) and closes the output
        pump; call it once *proc* has exited. This is the shape of the
        runner's ``watch(proc, session)`` seam.
        """

        def watch() -> None:
            event = self.run(proc)
            if event is not None:
                try:
                    on_hang(event)
                except Exception:
                    log.exception("The hang handler failed for process %s.", proc.pid)

        thread = threading.Thread(target=watch, name="harness-watchdog", daemon=True)
        thread.start()

        def stop() -> None:
            self._stop.set()
            thread.join()
            self.close()

        return stop

    def _event(
        self,
        kind: LimitKind,
        limit: float,
        start: float,
        started_at: float,
        proc: _Waitable,
    ) -> HangEvent:
        now = time.monotonic()
        event = HangEvent(
            kind=kind,
            limit=limit,
            elapsed=now - start,
            silent_for=None if self.pump is None else now - self.pump.last_output,
            started_at=started_at,
            detected_at=time.time(),
            pid=proc.pid,
        )
        log.info("Process %s hung: %s.", proc.pid, event.describe())
        return event

    def close(self) -> None:
        """Stop the output pump (see `OutputPump.close`)."""
        if self.pump is not None and self._opened:
            self.pump.close(self.drain)
        self._opened = False

    def __enter__(self) -> Watchdog:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
