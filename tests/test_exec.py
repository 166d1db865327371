"""``harness exec``: real commands, real signals, real orphans."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness import exit_codes
from harness.ports import port_is_leased
from harness.records import SessionStore
from harness.rtvars import RT_VARS_ENV, decode_rtvars
from harness.runner import default_leak_mode, shell_status

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="needs Linux (prctl, /proc)"
)


def harness(
    python: str, *args: str, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, "-m", "harness", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        **kwargs,  # type: ignore[call-overload]
    )


def start(python: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [python, "-m", "harness", *args],
        stdout=subprocess.PIPE,
        text=True,
    )


# ---------------------------------------------------------------- statuses


@pytest.mark.parametrize(
    ("script", "status"),
    [("exit 0", 0), ("exit 3", 3), ("kill -TERM $$", 143), ("kill -KILL $$", 137)],
)
def test_status_passes_through(python: str, script: str, status: int) -> None:
    assert harness(python, "exec", "--", "sh", "-c", script).returncode == status


def test_command_not_found(python: str) -> None:
    done = harness(python, "exec", "--", "no-such-command-here")
    assert done.returncode == 127
    assert "'no-such-command-here'" in done.stderr


def test_command_not_executable(python: str, tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    done = harness(python, "exec", "--", str(script))
    assert done.returncode == 126
    assert str(script) in done.stderr


def test_missing_command(python: str) -> None:
    done = harness(python, "exec")
    assert done.returncode == exit_codes.USAGE
    assert "no command given" in done.stderr


def test_shell_status() -> None:
    assert shell_status(0) == 0
    assert shell_status(4) == 4
    assert shell_status(-signal.SIGINT) == 130


def test_default_leak_mode() -> None:
    assert default_leak_mode({"CI": "true"}) == "fail"
    assert default_leak_mode({"CI": "1"}) == "fail"
    assert default_leak_mode({}) == "warn"
    assert default_leak_mode({"CI": "false"}) == "warn"


# ---------------------------------------------------------------- environment


def test_child_sees_the_session_and_it_leaves_nothing(
    python: str, runtime_dir: Path
) -> None:
    script = (
        "import json, os\n"
        "print(json.dumps({k: os.environ.get(k) for k in "
        f"('XDG_RUNTIME_DIR', 'HARNESS_RUNTIME_DIR', {RT_VARS_ENV!r})}}))"
    )
    done = harness(
        python,
        "exec",
        "--name",
        "tests-trio-uds",
        "--backend",
        "trio",
        "--transport",
        "uds",
        "--",
        python,
        "-c",
        script,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    rtvars = decode_rtvars(seen[RT_VARS_ENV])
    assert rtvars.session.startswith("tests-trio-uds-")
    assert rtvars.spawn_backend == "trio"
    assert rtvars.tpt_proto == "uds"
    assert seen["XDG_RUNTIME_DIR"] == rtvars.bindspace
    assert seen["HARNESS_RUNTIME_DIR"] == str(runtime_dir)
    port = int(str(rtvars._registry_addrs[0][1]).split("@")[1].split(".")[0])

    assert not Path(rtvars.bindspace or "/nonexistent").exists()
    assert SessionStore(runtime_dir).list() == []
    assert list((runtime_dir / "tractor").iterdir()) == []
    assert not port_is_leased(port)


LEAVE_SOCKET = (
    "import os, socket\n"
    "s = socket.socket(socket.AF_UNIX)\n"
    "s.bind(os.path.join(os.environ['XDG_RUNTIME_DIR'], 'tractor', 'a@1.sock'))\n"
)


@pytest.mark.parametrize(("mode", "status"), [("fail", exit_codes.LEAKED), ("warn", 0)])
def test_leftover_socket_and_leak_mode(
    python: str, runtime_dir: Path, mode: str, status: int
) -> None:
    done = harness(python, "exec", "--leaks", mode, "--", python, "-c", LEAVE_SOCKET)
    assert done.returncode == status
    assert "left 1 leak(s)" in done.stderr
    (record,) = SessionStore(runtime_dir).list()
    assert record.leak_count == 1
    assert record.exit_status == 0
    assert Path(record.bindspace, "tractor", "a@1.sock").exists()


# ---------------------------------------------------------------- signals

WAIT_FOR_SIGNAL = textwrap.dedent(
    """
    import signal, sys, time
    def handler(signum, frame):
        print("got", signum, flush=True)
        sys.exit(7)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)
    print("ready", flush=True)
    time.sleep(60)
    sys.exit(1)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_to_exec_reaches_the_command(python: str, sig: signal.Signals) -> None:
    proc = start(python, "exec", "--", python, "-c", WAIT_FOR_SIGNAL)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    assert out == f"got {int(sig)}\n"
    assert proc.returncode == 7


COUNT_SIGINT = textwrap.dedent(
    """
    import signal, time
    count = 0
    def handler(signum, frame):
        global count
        count += 1
    signal.signal(signal.SIGINT, handler)
    print("ready", flush=True)
    while count == 0:
        time.sleep(0.01)
    time.sleep(1.0)  # room for a second, forwarded copy to arrive
    print("count", count, flush=True)
    """
)


@linux_only
def test_terminal_ctrl_c_is_not_delivered_twice(python: str) -> None:
    """^C on a terminal reaches the command once, not once more via exec."""
    pid, master = pty.fork()
    if pid == 0:  # the child: session leader on the pty, like a shell's job
        try:
            os.execv(
                python,
                [python, "-m", "harness", "exec", "--", python, "-c", COUNT_SIGINT],
            )
        finally:
            os._exit(99)
    output = b""
    try:
        while b"ready" not in output:
            output += os.read(master, 1024)
        os.write(master, b"\x03")
        while True:
            try:
                chunk = os.read(master, 1024)
            except OSError:  # EIO: the other side closed
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(master)
        _, status = os.waitpid(pid, 0)
    assert b"count 1" in output, output
    assert os.waitstatus_to_exitcode(status) == 0


# ---------------------------------------------------------------- orphans

DOUBLE_FORK = textwrap.dedent(
    """
    import json, os, sys, time
    read_end, write_end = os.pipe()
    middle = os.fork()
    if middle == 0:
        parent = os.getpid()
        if os.fork() == 0:
            # The grandchild: wait until its parent is gone, report, exit.
            os.close(read_end)
            while os.getppid() == parent:
                time.sleep(0.01)
            os.write(write_end, json.dumps(
                {"pid": os.getpid(), "ppid": os.getppid()}).encode())
            os._exit(0)
        os._exit(0)
    os.close(write_end)
    os.waitpid(middle, 0)
    chunks = []
    while chunk := os.read(read_end, 1024):
        chunks.append(chunk)
    orphan = json.loads(b"".join(chunks))
    # The orphan has exited (the pipe closed); its new parent must reap it.
    state = "zombie"
    for _ in range(500):
        try:
            with open(f"/proc/{orphan['pid']}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            state = "reaped"
            break
        time.sleep(0.01)
    print(json.dumps({"exec": os.getppid(), "adopter": orphan["ppid"],
                      "state": state}))
    """
)


@linux_only
def test_double_fork_orphan_is_adopted_and_reaped(python: str) -> None:
    done = harness(python, "exec", "--", python, "-c", DOUBLE_FORK)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["adopter"] == seen["exec"]
    assert seen["state"] == "reaped"


# ---------------------------------------------------------------- seams

SEAMS = textwrap.dedent(
    """
    import json, os, subprocess, sys
    from dataclasses import dataclass
    from harness.runner import RunHooks, RunOptions, run_command

    @dataclass
    class Report:
        leak_count: int

    seen = {}

    def wrapper(argv, session):
        seen["wrapped_in"] = session.id
        return ["env", "WRAPPED=1", *argv]

    def watch(proc, session):
        seen["watched_pid"] = proc.pid
        return lambda: seen.setdefault("stopped", proc.poll())

    def after_exit(session, status):
        seen["status_in"] = status
        seen["record_open"] = session.store.read(session.id).closed_at is None
        session.leaks = Report(leak_count=2)
        return 0

    def spawn_options(session):
        return {"stdout": subprocess.DEVNULL}

    hooks = RunHooks(
        command_wrapper=wrapper,
        spawn_options=spawn_options,
        watch=watch,
        after_exit=after_exit,
    )
    status = run_command(
        ["sh", "-c", 'echo quiet; test "$WRAPPED" = 1 && exit 3'],
        RunOptions(name="seams"),
        hooks,
    )
    seen["final"] = status
    print(json.dumps(seen))
    """
)


def test_seams_are_called_in_order(python: str, runtime_dir: Path) -> None:
    # In a child: run_command makes its process a subreaper, never pytest's.
    done = subprocess.run(
        [python, "-c", SEAMS], capture_output=True, text=True, check=True, timeout=60
    )
    seen = json.loads(done.stdout)
    assert seen["wrapped_in"].startswith("seams-")
    assert seen["watched_pid"] > 0
    assert seen["stopped"] == 3
    assert seen["status_in"] == 3
    assert seen["record_open"] is True
    assert seen["final"] == 0
    (record,) = SessionStore(runtime_dir).list()
    assert record.id == seen["wrapped_in"]
    assert record.leak_count == 2


FAILING_WATCH = textwrap.dedent(
    """
    import json, os
    from harness.runner import RunHooks, run_command

    pids = []

    def watch(proc, session):
        pids.append(proc.pid)
        raise RuntimeError("watchdog broke")

    try:
        run_command(["sleep", "60"], hooks=RunHooks(watch=watch))
    except RuntimeError:
        pass
    alive = os.path.exists(f"/proc/{pids[0]}")
    print(json.dumps({"alive": alive}))
    """
)


@linux_only
def test_a_failing_hook_ends_the_command(python: str, runtime_dir: Path) -> None:
    done = subprocess.run(
        [python, "-c", FAILING_WATCH],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert json.loads(done.stdout) == {"alive": False}
    assert "terminating it" in done.stderr
    assert SessionStore(runtime_dir).list() == []


def test_nested_exec_sees_the_host_runtime_dir(python: str, runtime_dir: Path) -> None:
    inner = (
        "import json, os\n"
        "print(json.dumps([os.environ['XDG_RUNTIME_DIR'], "
        f"os.environ[{RT_VARS_ENV!r}]]))"
    )
    done = harness(
        python,
        "exec",
        "--name",
        "outer",
        "--",
        python,
        "-m",
        "harness",
        "exec",
        "--name",
        "inner",
        "--",
        python,
        "-c",
        inner,
    )
    assert done.returncode == 0, done.stderr
    xdg, envelope = json.loads(done.stdout)
    rtvars = decode_rtvars(envelope)
    assert rtvars.session.startswith("inner-")
    assert Path(xdg).parent == runtime_dir / "tractor"
