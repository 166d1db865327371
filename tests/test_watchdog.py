"""The hang watchdog on real commands: silent hangs, chatty runs, time limits.

The watchdog's output goes to a pipe that the test reads afterwards, so the
tests also prove that every byte the command printed was passed on.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import psutil
import pytest

from harness.errors import HarnessError
from harness.rtvars import RuntimeVars
from harness.watchdog import HangEvent, OutputPump, Watchdog


class Sink:
    """A pipe standing in for the real stdout or stderr, read at the end."""

    def __init__(self) -> None:
        self.read_fd, self.fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self._chunks: list[bytes] = []

    def text(self) -> str:
        while True:
            try:
                chunk = os.read(self.read_fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            self._chunks.append(chunk)
        return b"".join(self._chunks).decode()

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.read_fd)


@pytest.fixture
def sinks() -> Iterator[tuple[Sink, Sink]]:
    out, err = Sink(), Sink()
    yield out, err
    out.close()
    err.close()


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def _run(
    dog: Watchdog, cmd: list[str]
) -> tuple[subprocess.Popen[bytes], HangEvent | None]:
    with dog:
        proc = subprocess.Popen(cmd, **dog.popen_kwargs())
        try:
            event = dog.run(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    return proc, event


def test_silence_limit_fires_on_a_silent_hang(sinks: tuple[Sink, Sink]) -> None:
    out, err = sinks
    dog = Watchdog(silence=1.0, stdout_fd=out.fd, stderr_fd=err.fd)
    _, event = _run(
        dog,
        _python(
            """
            import time
            print("starting", flush=True)
            time.sleep(60)
            """
        ),
    )
    assert event is not None
    assert event.kind == "silence"
    assert "no output" in event.describe()
    assert out.text() == "starting\n"


def test_silence_limit_does_not_fire_on_a_slow_chatty_run(
    sinks: tuple[Sink, Sink],
) -> None:
    out, err = sinks
    dog = Watchdog(silence=2.0, stdout_fd=out.fd, stderr_fd=err.fd)
    proc, event = _run(
        dog,
        _python(
            """
            import sys, time
            for i in range(12):
                stream = sys.stdout if i % 2 else sys.stderr
                print(f"tick {i}", file=stream, flush=True)
                time.sleep(0.25)
            """
        ),
    )
    assert event is None
    assert proc.returncode == 0
    assert out.text().split() == [w for i in range(1, 12, 2) for w in ("tick", str(i))]
    assert err.text().split() == [w for i in range(0, 12, 2) for w in ("tick", str(i))]


def test_wall_clock_limit_fires_and_stdio_is_inherited() -> None:
    dog = Watchdog(timeout=1.0)
    assert dog.popen_kwargs() == {}, "without a silence limit nothing is pumped"
    _, event = _run(dog, _python("import time; time.sleep(60)"))
    assert event is not None
    assert event.kind == "timeout"
    assert event.silent_for is None


def test_wall_clock_limit_fires_on_a_chatty_run(sinks: tuple[Sink, Sink]) -> None:
    out, err = sinks
    dog = Watchdog(timeout=1.5, silence=5.0, stdout_fd=out.fd, stderr_fd=err.fd)
    _, event = _run(
        dog,
        _python(
            """
            import time
            while True:
                print("busy", flush=True)
                time.sleep(0.1)
            """
        ),
    )
    assert event is not None
    assert event.kind == "timeout"
    assert out.text().startswith("busy\n")


def test_run_returns_none_and_keeps_the_status_when_the_command_exits() -> None:
    dog = Watchdog(timeout=30.0)
    proc, event = _run(dog, _python("raise SystemExit(3)"))
    assert event is None
    assert proc.returncode == 3


def test_pty_mode_gives_the_command_a_terminal(sinks: tuple[Sink, Sink]) -> None:
    out, err = sinks
    dog = Watchdog(silence=10.0, output="pty", stdout_fd=out.fd, stderr_fd=err.fd)
    proc, event = _run(
        dog,
        _python(
            """
            import sys
            print("tty" if sys.stdout.isatty() else "no tty")
            print("line two")
            """
        ),
    )
    assert event is None
    assert proc.returncode == 0
    assert dog.pump is not None
    assert dog.pump.kinds == ("pty", "pty")
    # Newlines pass through unchanged: no "\r" added by the pty.
    assert out.text() == "tty\nline two\n"


def test_auto_mode_uses_pipes_when_our_output_is_not_a_terminal(
    sinks: tuple[Sink, Sink],
) -> None:
    out, err = sinks
    pump = OutputPump("auto", stdout_fd=out.fd, stderr_fd=err.fd)
    pump.open()
    try:
        assert pump.kinds == ("pipe", "pipe")
    finally:
        pump.close()


def test_pump_stops_even_when_a_leftover_process_holds_the_output(
    sinks: tuple[Sink, Sink],
) -> None:
    out, err = sinks
    dog = Watchdog(silence=10.0, stdout_fd=out.fd, stderr_fd=err.fd, drain=0.3)
    # The command exits at once but leaves a grandchild holding its stdout.
    code = """
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(child.pid, flush=True)
        """
    with dog:
        proc = subprocess.Popen(_python(code), **dog.popen_kwargs())
        event = dog.run(proc)
    grandchild = psutil.Process(int(out.text().split()[0]))
    assert "time.sleep(60)" in " ".join(grandchild.cmdline())
    try:
        assert event is None
        assert proc.returncode == 0
        assert dog.pump is not None
        assert dog.pump._thread is None, "close() returned with the pump running"
    finally:
        grandchild.kill()


def test_start_calls_the_hang_handler_in_its_thread() -> None:
    seen: list[HangEvent] = []
    dog = Watchdog(timeout=1.0)
    proc = subprocess.Popen(_python("import time; time.sleep(60)"))

    def on_hang(event: HangEvent) -> None:
        seen.append(event)
        proc.kill()  # what the runner's reap does

    stop = dog.start(proc, on_hang)
    try:
        proc.wait(timeout=30)
    finally:
        stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [e.kind for e in seen] == ["timeout"]
    assert seen[0].pid == proc.pid


def test_start_stops_without_firing_when_the_command_exits() -> None:
    seen: list[HangEvent] = []
    dog = Watchdog(timeout=30.0, silence=30.0)
    with dog:
        proc = subprocess.Popen(
            _python("print('done')"),
            **dog.popen_kwargs(),
        )
        stop = dog.start(proc, seen.append)
        proc.wait(timeout=30)
        stop()
    assert seen == []


def test_limits_come_from_the_envelope() -> None:
    dog = Watchdog.from_rtvars(RuntimeVars(diag_on_hang=600.0, diag_silence=120.0))
    assert (dog.timeout, dog.silence) == (600.0, 120.0)
    assert dog.enabled
    assert not Watchdog.from_rtvars(RuntimeVars()).enabled


@pytest.mark.parametrize("value", [0, -1.0])
def test_a_limit_must_be_positive(value: float) -> None:
    with pytest.raises(HarnessError, match="positive number of seconds"):
        Watchdog(silence=value)
