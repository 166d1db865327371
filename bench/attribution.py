"""Who finds a session's escaped processes: parent tree, a marker, the harness.

One session (a real `harness.session.Session`, opened by this script, which
plays the test process) leaks processes that escape in the ways real suites
see:

- a plain child that is still a child (the control);
- a double-forked daemon in its own session, re-parented away;
- a process started with ``setsid -f``, re-parented away;
- a process started with ``env -i`` (no envelope) that listens on a Unix
  socket in the session's bindspace, re-parented away;
- a child renamed with ``prctl(PR_SET_NAME)``: started from an executable
  named like the marker, it no longer carries it in its name, and its
  command line never did.

Every process but the renamed one carries the marker in its command line,
as tractor's actors carry ``tractor._child``. A second session, started
outside this script's process tree, leaks two marked daemons of its own: a
method that claims them would reap another run's processes.

Three methods look for the leaks, each as a tool would:

- parent tree: ``psutil.Process().children(recursive=True)`` of the test
  process, as psutil-based pytest fixtures do;
- marker: every process whose name or command line contains the marker, as
  reaper scripts do (``pgrep -f``);
- harness: `harness.leaks.check_leaks` on the session's record.

The table shows found / missed per escape and method, what each method
claimed of the other session, and how long each method took (median).

    python bench/attribution.py [--quick]

Everything lives in a private runtime dir and lease dir under /tmp; every
process started here is killed by pid and start time at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _table import console, machine_line, median, table

PYTHON = sys.executable

#: Writes its pid to argv[1] (atomically) and sleeps.
SLEEPER = textwrap.dedent(
    """
    import os, sys, time
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    while True:
        time.sleep(60)
    """
)

#: Forks twice around setsid, so the grandchild is a daemon of init (or of
#: the nearest subreaper); then as SLEEPER.
DOUBLE_FORK = (
    textwrap.dedent(
        """
    import os
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    """
    )
    + SLEEPER
)

#: Listens on the Unix socket argv[2], then as SLEEPER.
LISTENER = (
    textwrap.dedent(
        """
    import socket, sys
    s = socket.socket(socket.AF_UNIX)
    s.bind(sys.argv[2])
    s.listen()
    """
    )
    + SLEEPER
)

#: Renames itself with prctl(PR_SET_NAME), then as SLEEPER.
RENAMED = (
    textwrap.dedent(
        """
    import ctypes
    PR_SET_NAME = 15
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, b"renamed-worker", 0, 0, 0)
    """
    )
    + SLEEPER
)

#: The other session: opens a Session, leaks argv[2] marked daemons, writes
#: their pids to argv[1], and holds the session open until SIGTERM.
OTHER_SESSION = textwrap.dedent(
    """
    import json, os, signal, subprocess, sys, time
    from harness.session import Session

    double_fork, marker, count = sys.argv[3], sys.argv[4], int(sys.argv[2])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with Session("other") as session:
        pids = []
        for n in range(count):
            pid_file = f"{sys.argv[1]}.{n}"
            subprocess.run(
                [sys.executable, "-c", double_fork, pid_file, marker],
                env=session.env(), check=True,
            )
            while not os.path.exists(pid_file):
                time.sleep(0.01)
            pids.append(int(open(pid_file).read()))
        with open(sys.argv[1] + ".tmp", "w") as f:
            json.dump({"session": session.id, "owner": os.getpid(), "pids": pids}, f)
        os.rename(sys.argv[1] + ".tmp", sys.argv[1])
        while True:
            time.sleep(60)
    """
)

OTHER_LEAKS = 2

#: Leaked processes must not hold this script's stdout: a pipe reading it
#: would wait for them.
QUIET: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}


def wait_for_file(path: Path, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            msg = f"{path} did not appear within {timeout:g} s"
            raise TimeoutError(msg)
        time.sleep(0.01)
    return path.read_text()


@dataclass
class Escape:
    """One leaked process of the session, and how it got away."""

    label: str
    pid: int
    marked: bool


class Tracker:
    """Every process this script started, by pid and start time."""

    def __init__(self) -> None:
        self.started: list[tuple[int, float]] = []

    def track(self, pid: int) -> int:
        self.started.append((pid, psutil.Process(pid).create_time()))
        return pid

    def end(self, pid: int, signum: int = signal.SIGKILL) -> None:
        """Send *signum* to *pid* if it is still the process we started."""
        for started, create_time in self.started:
            if started != pid:
                continue
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if abs(proc.create_time() - create_time) < 0.01:
                    proc.send_signal(signum)
                    with contextlib.suppress(psutil.TimeoutExpired):
                        proc.wait(timeout=10)

    def kill_all(self) -> None:
        for pid, create_time in self.started:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if abs(proc.create_time() - create_time) < 0.01:
                    proc.send_signal(signal.SIGKILL)
                    with contextlib.suppress(psutil.TimeoutExpired):
                        proc.wait(timeout=5)


def leak(
    session_env: dict[str, str],
    bindspace: Path,
    folder: Path,
    marker: str,
    tracker: Tracker,
) -> list[Escape]:
    """Start the escapes of the module docstring; return them."""
    escapes = []

    def pid_from(path: Path) -> int:
        return tracker.track(int(wait_for_file(path)))

    child = subprocess.Popen(
        [PYTHON, "-c", SLEEPER, str(folder / "plain"), marker],
        env=session_env,
        **QUIET,
    )
    escapes.append(Escape("plain child (control)", pid_from(folder / "plain"), True))

    subprocess.run(
        [PYTHON, "-c", DOUBLE_FORK, str(folder / "daemon"), marker],
        env=session_env,
        check=True,
        **QUIET,
    )
    escapes.append(Escape("double fork, setsid", pid_from(folder / "daemon"), True))

    subprocess.run(
        ["setsid", "-f", PYTHON, "-c", SLEEPER, str(folder / "setsid"), marker],
        env=session_env,
        check=True,
        **QUIET,
    )
    escapes.append(Escape("setsid -f", pid_from(folder / "setsid"), True))

    socket_dir = bindspace / "tractor"
    socket_dir.mkdir(exist_ok=True)
    subprocess.run(
        [
            "setsid",
            "-f",
            "env",
            "-i",
            PYTHON,
            "-c",
            LISTENER,
            str(folder / "env-i"),
            str(socket_dir / "leaked@1.sock"),
            marker,
        ],
        env=session_env,
        check=True,
        **QUIET,
    )
    escapes.append(
        Escape("env -i, holds a bindspace socket", pid_from(folder / "env-i"), True)
    )

    # An executable named like the marker; argv[0] says something else, so
    # only the name (comm) carries the marker until prctl changes it.
    named = folder / marker
    named.symlink_to(os.path.realpath(PYTHON))
    renamed = subprocess.Popen(
        ["worker", "-c", RENAMED, str(folder / "renamed")],
        executable=str(named),
        env=session_env,
        **QUIET,
    )
    escapes.append(
        Escape("prctl(PR_SET_NAME) renamed", pid_from(folder / "renamed"), False)
    )
    tracker.track(child.pid)
    tracker.track(renamed.pid)
    return escapes


def other_session(
    folder: Path, marker: str, tracker: Tracker
) -> tuple[str, int, set[int]]:
    """Start the other session outside our process tree: its id, its owner's
    pid and the pids it leaked."""
    result = folder / "other.json"
    subprocess.run(
        [
            "setsid",
            "-f",
            PYTHON,
            "-c",
            OTHER_SESSION,
            str(result),
            str(OTHER_LEAKS),
            DOUBLE_FORK,
            marker,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import json

    data = json.loads(wait_for_file(result))
    owner = tracker.track(data["owner"])
    pids = {tracker.track(pid) for pid in data["pids"]}
    return data["session"], owner, pids


# ------------------------------------------------------------------ methods


def by_parent_tree() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def by_marker(marker: str) -> Callable[[], set[int]]:
    def scan() -> set[int]:
        found = set()
        for proc in psutil.process_iter(["name", "cmdline"]):
            if proc.pid == os.getpid():
                continue
            name = proc.info["name"] or ""
            cmdline = " ".join(proc.info["cmdline"] or ())
            if marker in name or marker in cmdline:
                found.add(proc.pid)
        return found

    return scan


def timed(method: Callable[[], set[int]], repeat: int) -> tuple[set[int], float]:
    """The pids *method* found, and its median time in seconds."""
    times = []
    found: set[int] = set()
    for _ in range(repeat):
        began = time.perf_counter()
        found = method()
        times.append(time.perf_counter() - began)
    return found, median(times)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="fewer timing repeats")
    args = parser.parse_args()
    repeat = 3 if args.quick else 11

    folder = Path(tempfile.mkdtemp(prefix="hbench-attr-", dir="/tmp"))
    os.environ["HARNESS_RUNTIME_DIR"] = str(folder / "rt")
    os.environ["HARNESS_LEASE_DIR"] = str(folder / "leases")
    os.environ.pop("_TRACTOR_RT_VARS", None)
    # Imported after the runtime dir is set: nothing touches the real one.
    from harness.leaks import check_leaks
    from harness.session import Session

    marker = f"_child-{secrets.token_hex(3)}"
    tracker = Tracker()
    out = console()
    session = Session("attribution").open()
    try:
        escapes = leak(session.env(), session.bindspace, folder, marker, tracker)
        other_id, other_owner, other_pids = other_session(folder, marker, tracker)

        def by_harness() -> set[int]:
            return {p.pid for p in check_leaks(session.record).processes}

        methods = {
            "parent tree": by_parent_tree,
            "marker": by_marker(marker),
            "harness": by_harness,
        }
        results = {name: timed(method, repeat) for name, method in methods.items()}
        hows = {p.pid: ", ".join(p.how) for p in check_leaks(session.record).processes}
    finally:
        # The other session's owner closes its session on SIGTERM; then
        # every process started here dies, and the socket file it left.
        if "other_owner" in locals():
            tracker.end(other_owner, signal.SIGTERM)
        tracker.kill_all()
        for path in (session.bindspace / "tractor").glob("*.sock"):
            path.unlink()
        session.close()
        shutil.rmtree(folder, ignore_errors=True)

    out.print(f"Orphan attribution on {machine_line()}")
    out.print(
        f"Session {session.id} leaked {len(escapes)} processes; session "
        f"{other_id} ran at the same time and leaked {len(other_pids)} marked "
        f"daemons. Marker: {marker!r}.\n"
    )
    names = list(methods)
    grid = table(
        "Found (yes) or missed (NO), per escape and method",
        ["escape", "pid", *names, "harness: how"],
        right=["pid"],
    )
    ours = {e.pid for e in escapes}
    for escape in escapes:
        cells = [
            "yes" if escape.pid in results[name][0] else "[red]NO[/red]"
            for name in names
        ]
        grid.add_row(escape.label, str(escape.pid), *cells, hows.get(escape.pid, "-"))
    out.print(grid)

    summary = table(
        "Per method",
        ["method", "found", "missed", "other session's claimed", "median ms"],
        right=["found", "missed", "other session's claimed", "median ms"],
    )
    for name in names:
        found, seconds = results[name]
        summary.add_row(
            name,
            f"{len(found & ours)}/{len(ours)}",
            str(len(ours - found)),
            f"{len(found & other_pids)}/{len(other_pids)}",
            f"{seconds * 1e3:.1f}",
        )
    out.print(summary)
    out.print(
        "harness: how is what attributed the process: descendant (of the "
        "owner, while it runs), envelope (its environment), socket (it holds "
        "a socket in the bindspace)."
    )
    harness_found = results["harness"][0]
    clean = ours <= harness_found and not (harness_found & other_pids)
    out.print(
        ("[green]met[/green]" if clean else "[red]MISSED[/red]")
        + ": the harness found every escape and claimed none of the other "
        "session's processes"
    )
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
