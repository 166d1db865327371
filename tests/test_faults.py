"""Fault injection: killed owners, hostile file systems, stolen ports, crowds.

Each test breaks a real session the way hosts break them (SIGKILL, a full or
read-only runtime dir, a bindspace deleted under a running command, a port
taken by another program, 32 sessions at once) and then checks what a user
would: a message that names the path or port and the fix, never a bare
traceback; and afterwards, with ``harness reap --stale`` and ``harness
sessions --prune``, a host with nothing of those sessions left.

The fast ones run by default; the stress ones are ``slow``:
``.venv/bin/pytest -m slow tests/test_faults.py``. Every process a test starts
carries that test's runtime dir in its environment, and only such processes
are ever signalled. Mount-namespace tests skip where ``unshare -m`` is not
permitted.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import psutil
import pytest

from harness.leaks import check_leaks
from harness.ports import lease_port, port_is_leased
from harness.records import SessionRecord, SessionStore
from harness.session import prune_sessions

PYTHON = sys.executable

#: A daemon of the session: forks away twice (so it outlives the command and
#: its owner), listens on a Unix socket in the bindspace, writes its pid to
#: argv[1] and sleeps.
LEAKING_DAEMON = textwrap.dedent(
    """
    import os, socket, sys, time
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    folder = os.path.join(os.environ["XDG_RUNTIME_DIR"], "tractor")
    os.makedirs(folder, exist_ok=True)
    s = socket.socket(socket.AF_UNIX)
    s.bind(os.path.join(folder, f"leak@{os.getpid()}.sock"))
    s.listen()
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    while True:
        time.sleep(60)
    """
)


def harness(
    *args: str, timeout: float = 120, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    """Run the ``harness`` CLI with this test's runtime dir and lease dir."""
    return subprocess.run(
        [PYTHON, "-m", "harness", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,  # type: ignore[arg-type]
    )


def wait_for(predicate: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {predicate}")
        time.sleep(0.01)


def processes_of(runtime_dir: Path) -> list[int]:
    """Pids of live processes whose environment names *runtime_dir*: every
    process of this test's sessions carries it in its envelope."""
    needle = str(runtime_dir).encode()
    found = []
    for proc in psutil.process_iter(["status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in Path(f"/proc/{proc.pid}/environ").read_bytes():
                found.append(proc.pid)
    return found


def kill_processes_of(runtime_dir: Path) -> None:
    """Safety net for a failing test: SIGKILL what carries *runtime_dir*."""
    for pid in processes_of(runtime_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(autouse=True)
def private_leases(
    monkeypatch: pytest.MonkeyPatch, runtime_dir: Path
) -> Iterator[Path]:
    """A private lease dir, and no process of the test left behind."""
    leases = runtime_dir.with_name(runtime_dir.name + "-leases")
    monkeypatch.setenv("HARNESS_LEASE_DIR", str(leases))
    yield leases
    kill_processes_of(runtime_dir)
    shutil.rmtree(leases, ignore_errors=True)


def no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr


# ------------------------------------------------- a port taken by a stranger

# Started before the session and outside its process tree (``setsid -f``):
# writes argv[1]/ready, waits for a port number in argv[1]/port, binds it,
# writes its pid to argv[1]/listening, sleeps. A program outside the harness
# that binds a port at the wrong moment.
STRANGER = textwrap.dedent(
    """
    import os, socket, sys, time
    folder = sys.argv[1]
    open(os.path.join(folder, "ready"), "w").close()
    while not os.path.exists(os.path.join(folder, "port")):
        time.sleep(0.01)
    port = int(open(os.path.join(folder, "port")).read())
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen()
    with open(os.path.join(folder, "listening.tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.rename(os.path.join(folder, "listening.tmp"), os.path.join(folder, "listening"))
    while True:
        time.sleep(60)
    """
)


#: The session's command: hands its registry port to the stranger, waits
#: until the stranger listens on it, exits 0.
HAND_OVER = textwrap.dedent(
    """
    import os, sys, time
    from harness.rtvars import load_rtvars
    port = load_rtvars(os.environ)._registry_addrs[0][1]
    with open(os.path.join(sys.argv[1], "port"), "w") as f:
        f.write(str(port))
    while not os.path.exists(os.path.join(sys.argv[1], "listening")):
        time.sleep(0.01)
    """
)


def test_a_stranger_on_the_leased_port_is_reported_and_never_reaped(
    runtime_dir: Path, tmp_path: Path
) -> None:
    # The stranger carries the runtime dir only so that the fixture's safety
    # net finds it; it has no envelope.
    subprocess.run(
        ["setsid", "-f", PYTHON, "-c", STRANGER, str(tmp_path)],
        env={
            **{k: v for k, v in os.environ.items() if k != "_TRACTOR_RT_VARS"},
            "STRANGER_OF": str(runtime_dir),
        },
        check=True,
    )
    # Older than the session by more than a clock tick, as a program
    # already running on the host is.
    wait_for((tmp_path / "ready").exists)
    time.sleep(0.1)
    # Between the lease's probe and the registry's bind, the port goes to a
    # program the session never started; the leak mode is reap.
    result = harness(
        "exec",
        "--leaks",
        "reap",
        "--report",
        str(tmp_path / "leaks.json"),
        "--",
        PYTHON,
        "-c",
        HAND_OVER,
        str(tmp_path),
    )
    stranger = psutil.Process(int((tmp_path / "listening").read_text()))
    port = int((tmp_path / "port").read_text())
    try:
        no_traceback(result.stderr)
        assert stranger.is_running(), "the reap killed a stranger"
        # The port is still taken when the session ends: a leak, said so.
        assert result.returncode == 86, result.stderr
        assert "left 1 port listener" in result.stderr
        report = msgspec.json.decode((tmp_path / "leaks.json").read_bytes())
        assert [(x["port"], x["pids"]) for x in report["report"]["listeners"]] == [
            (port, [stranger.pid])
        ]
        assert report["report"]["processes"] == []
        assert [s["pid"] for s in report["report"]["skipped"]] == [stranger.pid]
        assert report["report"]["skipped"][0]["reason"] == (
            "started before the session's owner"
        )
    finally:
        stranger.kill()


def test_a_port_range_held_by_a_stranger_is_a_clear_error(runtime_dir: Path) -> None:
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        port = stranger.getsockname()[1]
        result = harness(
            "exec",
            "--",
            "true",
            env={**os.environ, "HARNESS_PORT_RANGE": f"{port}-{port}"},
        )
    assert result.returncode == 85
    no_traceback(result.stderr)
    assert f"no free port in {port}-{port}" in result.stderr
    assert "1 in use by other sockets" in result.stderr
    assert "HARNESS_PORT_RANGE" in result.stderr
    assert SessionStore(runtime_dir).list() == []


# ------------------------------------------------------------ hostile file systems


def _unshare_works() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "true"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


needs_mount_ns = pytest.mark.skipif(
    not _unshare_works(), reason="needs root and `unshare -m` (a private mount ns)"
)


def _in_mount_ns(script: str, runtime_dir: Path) -> subprocess.CompletedProcess[str]:
    """Run *script* (sh) in a private mount namespace; $RT is the runtime dir."""
    return subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "RT": str(runtime_dir), "PY": PYTHON},
    )


@needs_mount_ns
def test_a_read_only_runtime_dir_is_a_clear_error(runtime_dir: Path) -> None:
    result = _in_mount_ns(
        'mount --bind "$RT" "$RT" && mount -o remount,bind,ro "$RT" && '
        'exec "$PY" -m harness exec -- true',
        runtime_dir,
    )
    assert result.returncode == 85, result.stderr
    no_traceback(result.stderr)
    assert str(runtime_dir) in result.stderr
    assert "Read-only file system" in result.stderr
    assert "$HARNESS_RUNTIME_DIR" in result.stderr


@needs_mount_ns
def test_a_full_runtime_dir_is_a_clear_error_and_leaves_nothing(
    runtime_dir: Path,
) -> None:
    # A 64 KiB tmpfs over the runtime dir, its folders made first, then
    # filled to the last byte: the session's record cannot be written.
    result = _in_mount_ns(
        'mount -t tmpfs -o size=64k,mode=0700 tmpfs "$RT" && '
        'mkdir -m 700 "$RT/harness" "$RT/harness/sessions" "$RT/tractor" && '
        'dd if=/dev/zero of="$RT/filler" bs=4k 2>/dev/null; '
        '"$PY" -m harness exec -- true; status=$?; '
        'echo "left: $(ls -A "$RT/tractor" "$RT/harness/sessions" | tr "\\n" " ")"; '
        "exit $status",
        runtime_dir,
    )
    assert result.returncode == 85, result.stderr
    no_traceback(result.stderr)
    assert "No space left on device" in result.stderr
    assert str(runtime_dir) in result.stderr
    assert "not full" in result.stderr
    # Nothing of the half-opened session: no bindspace, no record, no temp.
    assert result.stdout.split(":", 1)[1].split() == [
        f"{runtime_dir}/harness/sessions:",
        f"{runtime_dir}/tractor:",
    ]


def test_a_bindspace_deleted_under_a_running_command(runtime_dir: Path) -> None:
    result = harness(
        "exec",
        "--leaks",
        "fail",
        "--",
        "sh",
        "-c",
        'rm -rf "$XDG_RUNTIME_DIR" && test ! -e "$XDG_RUNTIME_DIR"',
    )
    assert result.returncode == 0, result.stderr
    no_traceback(result.stderr)
    assert SessionStore(runtime_dir).list() == []
    assert list((runtime_dir / "tractor").iterdir()) == []


def test_a_bindspace_replaced_by_a_file_under_a_running_command(
    runtime_dir: Path,
) -> None:
    result = harness(
        "exec",
        "--",
        "sh",
        "-c",
        'rm -rf "$XDG_RUNTIME_DIR" && echo junk > "$XDG_RUNTIME_DIR"',
    )
    no_traceback(result.stderr)
    bindspace = next((runtime_dir / "tractor").iterdir(), None)
    if result.returncode == 85:
        # Refused to remove a non-folder: the message names it.
        assert bindspace is not None
        assert str(bindspace) in result.stderr
    else:
        assert result.returncode == 0, result.stderr


# ----------------------------------------------------- temp files of dead writers


def test_prune_removes_the_temp_file_of_a_writer_killed_before_its_rename(
    runtime_dir: Path,
) -> None:
    store = SessionStore(runtime_dir)
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = store.dir / f".gone-0123abcd.{dead.pid}.tmp"
    orphan.write_bytes(b'{"id": "gone-0')  # cut off mid-write
    mine = store.dir / f".live-0123abcd.{os.getpid()}.tmp"
    mine.write_bytes(b"{")
    assert store.list() == []
    prune_sessions(runtime_dir)
    assert not orphan.exists()
    assert mine.exists(), "a running writer's temp file was removed"


# ------------------------------------------------------ SIGKILL the owner, often

#: The command of a killed session: notes its start, leaks a daemon with a
#: socket in the bindspace, runs a moment, notes its end, exits.
KILLED_COMMAND = textwrap.dedent(
    """
    import os, subprocess, sys, time
    folder, daemon, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])
    open(os.path.join(folder, "started"), "w").write(str(os.getpid()))
    subprocess.run([sys.executable, "-c", daemon, os.path.join(folder, "daemon")])
    time.sleep(pause)
    open(os.path.join(folder, "done"), "w").close()
    """
)


class RecordWatcher(threading.Thread):
    """Reads every session record, all the time; any that fails to parse is
    a half-written record."""

    def __init__(self, store: SessionStore) -> None:
        super().__init__(daemon=True)
        self.store = store
        self.stop = threading.Event()
        self.reads = 0
        self.broken: list[str] = []
        self.ports: set[int] = set()

    def run(self) -> None:
        while not self.stop.is_set():
            for path in self.store.dir.glob("*.json"):
                try:
                    record = msgspec.json.decode(path.read_bytes(), type=SessionRecord)
                except FileNotFoundError:
                    continue
                except (OSError, msgspec.DecodeError) as exc:
                    self.broken.append(f"{path}: {exc}")
                    continue
                self.reads += 1
                if record.port is not None:
                    self.ports.add(record.port)
            time.sleep(0.002)


def _kill_one(folder: Path, phase: str, rng: random.Random) -> subprocess.Popen[bytes]:
    """Start ``harness exec`` and SIGKILL it in *phase*: ``opening`` (lease,
    bindspace, record), ``running`` (the command runs) or ``checking`` (the
    command has exited; the leak check runs)."""
    owner = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "harness",
            "exec",
            "--leaks",
            "warn",
            "--",
            PYTHON,
            "-c",
            KILLED_COMMAND,
            str(folder),
            LEAKING_DAEMON,
            f"{rng.uniform(0.0, 0.3):.3f}",
        ],
        stdout=subprocess.DEVNULL,
        # A file, not a pipe: the orphaned command keeps its copy open.
        stderr=(folder / "stderr").open("w"),
    )
    if phase == "opening":
        time.sleep(rng.uniform(0.0, 0.6))
    else:
        mark = folder / ("started" if phase == "running" else "done")
        with contextlib.suppress(AssertionError):
            wait_for(lambda: mark.exists() or owner.poll() is not None, 30)
        time.sleep(rng.uniform(0.0, 0.2 if phase == "running" else 0.08))
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    return owner


@pytest.mark.slow
def test_sigkilled_owners_at_random_points_leave_a_host_reap_and_prune_restore(
    runtime_dir: Path, private_leases: Path, tmp_path: Path
) -> None:
    """30 owners SIGKILLed while opening, while the command runs, during the
    leak check; records always parse; reap + prune leave nothing."""
    rng = random.Random(os.environ.get("FAULT_SEED", "20261203"))
    store = SessionStore(runtime_dir)
    watcher = RecordWatcher(store)
    watcher.start()
    phases = ["opening", "running", "checking"] * 10
    rng.shuffle(phases)
    outcomes: list[str] = []
    try:
        for index, phase in enumerate(phases):
            folder = tmp_path / f"s{index}"
            folder.mkdir()
            owner = _kill_one(folder, phase, rng)
            no_traceback((folder / "stderr").read_text())
            outcomes.append(phase if owner.returncode == -signal.SIGKILL else "ended")

        # Commands outlive their killed owner; let them finish on their own.
        for folder in tmp_path.iterdir():
            started = folder / "started"
            if started.exists():
                pid = int(started.read_text())
                with contextlib.suppress(psutil.Error):
                    psutil.Process(pid).wait(timeout=30)
    finally:
        watcher.stop.set()
        watcher.join()

    assert watcher.broken == [], "a session record was read half-written"
    assert watcher.reads > 0
    # The kills landed in every phase (an owner that ended first counts apart).
    assert {"opening", "running", "checking"} <= set(outcomes), outcomes

    # What a user runs: reap the processes, then prune what is left. An
    # orphan bindspace (killed between mkdir and the record) is pruned only
    # past a grace period, so that a session opening right now is spared;
    # the test ages those folders past it instead of waiting a minute.
    reaped = harness("reap", "--stale", "--grace", "1")
    no_traceback(reaped.stderr)
    assert reaped.returncode == 0, reaped.stdout + reaped.stderr
    known = {r.id for r in store.list()}
    for bindspace in (runtime_dir / "tractor").iterdir():
        if bindspace.name not in known:
            old = time.time() - 120
            os.utime(bindspace, (old, old))
    pruned = harness("sessions", "--prune")
    no_traceback(pruned.stderr)
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr

    assert list((runtime_dir / "tractor").iterdir()) == [], pruned.stdout
    assert list(store.dir.iterdir()) == [], "records or temp files left"
    assert processes_of(runtime_dir) == []
    for port in watcher.ports:
        assert not port_is_leased(port, lease_dir=private_leases)
    port = min(watcher.ports)
    with lease_port(port_range=(port, port), lease_dir=private_leases) as lease:
        assert lease.port == port


# ------------------------------------------------------- 32 sessions at once

#: A session's command: writes its envelope's session, port and bindspace to
#: argv[1]; with argv[2] == "leak" it leaves a daemon behind, else a child
#: that it waits for.
CROWD_COMMAND = textwrap.dedent(
    """
    import json, os, subprocess, sys
    from harness.rtvars import load_rtvars
    rtvars = load_rtvars(os.environ)
    folder, mode, daemon = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(os.path.join(folder, "session.json"), "w") as f:
        json.dump({"id": rtvars.session, "bindspace": rtvars.bindspace,
                   "port": rtvars._registry_addrs[0][1]}, f)
    if mode == "leak":
        subprocess.run([sys.executable, "-c", daemon, os.path.join(folder, "daemon")])
    else:
        subprocess.run([sys.executable, "-c", "import time; time.sleep(0.2)"])
    """
)


@pytest.mark.slow
def test_32_concurrent_sessions_half_leaking_are_told_apart(
    runtime_dir: Path, tmp_path: Path
) -> None:
    import json

    folders = [tmp_path / f"c{index}" for index in range(32)]
    owners = []
    for index, folder in enumerate(folders):
        folder.mkdir()
        mode = "leak" if index % 2 else "clean"
        owners.append(
            subprocess.Popen(
                [
                    PYTHON,
                    "-m",
                    "harness",
                    "exec",
                    "--name",
                    f"crowd{index}",
                    "--leaks",
                    "fail",
                    "--",
                    PYTHON,
                    "-c",
                    CROWD_COMMAND,
                    str(folder),
                    mode,
                    LEAKING_DAEMON,
                ],
                stdout=subprocess.DEVNULL,
                stderr=(folder / "stderr").open("w"),
            )
        )
    statuses = [owner.wait(timeout=300) for owner in owners]
    for folder in folders:
        no_traceback((folder / "stderr").read_text())

    sessions = [json.loads((f / "session.json").read_text()) for f in folders]
    assert len({s["port"] for s in sessions}) == 32, "a port went to two sessions"
    assert len({s["bindspace"] for s in sessions}) == 32
    assert len({s["id"] for s in sessions}) == 32
    # Clean sessions pass and vanish; leaking ones fail with 86 and stay.
    assert statuses == [0, 86] * 16
    daemons = {
        s["id"]: int((f / "daemon").read_text())
        for s, f in zip(sessions, folders, strict=True)
        if (f / "daemon").exists()
    }
    assert len(daemons) == 16

    store = SessionStore(runtime_dir)
    records = {r.id: r for r in store.list()}
    assert set(records) == set(daemons)
    for session_id, record in records.items():
        report = check_leaks(record)
        found = {p.pid for p in report.processes}
        # Exactly its own daemon: none of the 15 other daemons.
        assert found == {daemons[session_id]}, (session_id, report.processes)
        assert [Path(s.path).parent.parent.name for s in report.sockets] == [session_id]

    reaped = harness("reap", "--stale", "--grace", "1")
    assert reaped.returncode == 0, reaped.stdout + reaped.stderr
    no_traceback(reaped.stderr)
    assert store.list() == []
    assert list((runtime_dir / "tractor").iterdir()) == []
    assert processes_of(runtime_dir) == []
