"""Hand-built sessions that leak on purpose, for the leak check's tests.

A `HandSession` is what `harness.session.Session` would leave on disk (a
record in the store, a bindspace folder) plus real processes started with
the session's envelope. Every process a test starts is tracked by pid and
creation time, and `HandSession.cleanup` kills exactly those, so a failing
test never leaves them behind and never touches anything else.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from harness.records import SessionRecord, SessionStore
from harness.rtvars import RuntimeVars, dump_rtvars

PYTHON = sys.executable


def wait_for(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll *predicate* until it is true; fail the test after *timeout* s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {predicate}")
        time.sleep(0.02)


def alive(pid: int) -> bool:
    """Whether *pid* runs (a zombie does not count)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dead_process() -> tuple[int, float]:
    """The pid and creation time of a process that has exited."""
    proc = subprocess.Popen(["sleep", "60"])
    create_time = psutil.Process(proc.pid).create_time()
    proc.kill()
    proc.wait()
    return proc.pid, create_time


# A child that binds a Unix socket at argv[1] and listens until killed.
UDS_LISTENER = textwrap.dedent(
    """
    import socket, sys, time
    s = socket.socket(socket.AF_UNIX)
    s.bind(sys.argv[1])
    s.listen()
    while True:
        time.sleep(60)
    """
)

# A child that listens on 127.0.0.1:argv[1] until killed.
TCP_LISTENER = textwrap.dedent(
    """
    import socket, sys, time
    s = socket.socket()
    s.bind(("127.0.0.1", int(sys.argv[1])))
    s.listen()
    print("listening", flush=True)
    while True:
        time.sleep(60)
    """
)

# Forks twice so the grandchild is orphaned, a daemon in its own session;
# writes its pid to argv[1].
DOUBLE_FORK = textwrap.dedent(
    """
    import os, sys, time
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    while True:
        time.sleep(60)
    """
)

# Ignores the signals named in argv[1:] and says so.
STUBBORN = textwrap.dedent(
    """
    import signal, sys, time
    for name in sys.argv[1:]:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    print("ready", flush=True)
    while True:
        time.sleep(60)
    """
)

# An owner that starts `python -c argv[1]`-less children: each further
# argument is a shell command run as its child; it never waits for them, so
# one that exits becomes a zombie.
OWNER = textwrap.dedent(
    """
    import subprocess, sys, time
    children = [subprocess.Popen(c, shell=True) for c in sys.argv[1:]]
    print("ready", flush=True)
    while True:
        time.sleep(60)
    """
)


@dataclass
class HandSession:
    """A session record, its bindspace and the processes a test started."""

    record: SessionRecord
    env: dict[str, str]
    owner: subprocess.Popen[bytes] | None = None
    started: list[tuple[int, float]] = field(default_factory=list)
    popens: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def bindspace(self) -> Path:
        return Path(self.record.bindspace)

    def track(self, pid: int) -> psutil.Process:
        proc = psutil.Process(pid)
        self.started.append((pid, proc.create_time()))
        return proc

    def spawn(
        self,
        args: Sequence[str],
        *,
        envelope: bool = True,
        env: dict[str, str] | None = None,
        **kwargs: object,
    ) -> subprocess.Popen[bytes]:
        """Start *args* with the session's envelope (or without, or *env*)."""
        if env is None:
            env = dict(self.env) if envelope else _without_envelope()
        proc: subprocess.Popen[bytes] = subprocess.Popen(args, env=env, **kwargs)  # type: ignore[call-overload]
        self.track(proc.pid)
        self.popens.append(proc)
        return proc

    def python(
        self, code: str, *args: str, **kwargs: object
    ) -> subprocess.Popen[bytes]:
        return self.spawn([PYTHON, "-c", code, *args], **kwargs)

    def uds_listener(
        self, name: str, **kwargs: object
    ) -> tuple[subprocess.Popen[bytes], Path]:
        """A child listening on ``<bindspace>/tractor/<name>``."""
        path = self.bindspace / "tractor" / name
        path.parent.mkdir(exist_ok=True)
        proc = self.python(UDS_LISTENER, str(path), **kwargs)
        wait_for(path.exists)
        return proc, path

    def daemon(self) -> int:
        """A double-forked daemon with the envelope; returns its pid."""
        pid_file = self.bindspace.parent / f"{self.id}.daemon-{secrets.token_hex(3)}"
        self.python(DOUBLE_FORK, str(pid_file)).wait()
        wait_for(pid_file.exists)
        pid = int(pid_file.read_text())
        pid_file.unlink()
        self.track(pid)
        return pid

    def cleanup(self) -> None:
        """Kill what this session's test started, if it is still that process."""
        for pid, create_time in self.started:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if abs(proc.create_time() - create_time) < 0.01:
                    proc.send_signal(signal.SIGKILL)
        for proc in [*self.popens, *([self.owner] if self.owner else [])]:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                proc.wait(timeout=5)


class SessionFactory:
    """Makes hand-built sessions in one runtime dir and cleans them all up."""

    def __init__(self, runtime_dir: Path) -> None:
        self.runtime_dir = runtime_dir
        self.sessions: list[HandSession] = []

    def __call__(self, name: str = "leaky", **kwargs: object) -> HandSession:
        session = make_session(self.runtime_dir, name, **kwargs)  # type: ignore[arg-type]
        self.sessions.append(session)
        return session

    def cleanup(self) -> None:
        for session in self.sessions:
            session.cleanup()


def _without_envelope() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "_TRACTOR_RT_VARS"}


def make_session(
    runtime_dir: Path,
    name: str = "leaky",
    *,
    port: int | None = None,
    owner_children: Sequence[str] | None = None,
) -> HandSession:
    """Write a session record and bindspace, as the harness would.

    Without *owner_children* the owner is a process that has already exited
    (a stale session). With it, the owner is a live process (started with
    the envelope) that runs each shell command in *owner_children* as its
    child (through ``sh -c``; start each with ``exec``) and never waits for
    them.
    """
    session_id = f"{name}-{secrets.token_hex(4)}"
    bindspace = runtime_dir / "tractor" / session_id
    bindspace.mkdir(parents=True)
    rtvars = RuntimeVars(session=session_id, bindspace=str(bindspace))
    key, value = dump_rtvars(rtvars)
    env = {**_without_envelope(), key: value}

    owner = None
    if owner_children is None:
        owner_pid, owner_create_time = dead_process()
    else:
        owner = subprocess.Popen(
            [PYTHON, "-c", OWNER, *owner_children],
            env=env,
            stdout=subprocess.PIPE,
        )
        assert owner.stdout is not None
        owner.stdout.readline()
        owner_pid = owner.pid
        owner_create_time = psutil.Process(owner.pid).create_time()

    record = SessionRecord(
        id=session_id,
        name=name,
        owner_pid=owner_pid,
        owner_create_time=owner_create_time,
        uid=os.getuid(),
        runtime_dir=str(runtime_dir),
        bindspace=str(bindspace),
        port=port,
    )
    SessionStore(runtime_dir).write(record)
    session = HandSession(record=record, env=env, owner=owner)
    if owner is not None:
        session.started.append((owner_pid, owner_create_time))
        try:
            wait_for(
                lambda: len(psutil.Process(owner_pid).children()) >= len(owner_children)
            )
            for child in psutil.Process(owner_pid).children():
                session.track(child.pid)
        except BaseException:
            session.cleanup()  # the factory never saw this session
            raise
    return session
