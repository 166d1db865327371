"""How long the leak check takes with many unrelated processes on the host.

Starts N idle processes (``sleep``) that belong to no session, then times
`harness.leaks.check_leaks` on a stale session that leaked one daemon, one
stale socket file and one live one, for N in 100, 500 and 1000
(``--quick``: 100 and 500, fewer repeats). Prints the median, the cost per
process on the host, and what the check found, which must stay the same at
every N.

    python bench/leak_check.py [--quick] [--repeat R]

Everything runs under a private ``$HARNESS_RUNTIME_DIR`` and every process
started here is killed by pid at the end; nothing else is touched.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table


def _sleepers(count: int) -> list[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if k != "_TRACTOR_RT_VARS"}
    return [subprocess.Popen(["sleep", "600"], env=env) for _ in range(count)]


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    for proc in procs:
        proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="under a minute")
    parser.add_argument("--repeat", type=int, default=None, help="checks per size")
    args = parser.parse_args()
    sizes = [100, 500] if args.quick else [100, 500, 1000]
    repeat = args.repeat or (5 if args.quick else 11)

    runtime = Path(tempfile.mkdtemp(prefix="hbench-", dir="/tmp"))
    os.environ["HARNESS_RUNTIME_DIR"] = str(runtime)
    # Imported after the runtime dir is set, so nothing touches the real one.
    from harness.leaks import check_leaks
    from harness.records import SessionRecord, SessionStore
    from harness.rtvars import RuntimeVars, dump_rtvars

    session_id = "bench-0badc0de"
    bindspace = runtime / "tractor" / session_id
    bindspace.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(bindspace / "actor@1.sock"))
    stale.close()
    # A live listener in the bindspace makes the check map socket inodes to
    # processes, which reads the descriptors of every process of the user.
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(bindspace / "registry@1616.sock"))
    live.listen()
    owner = subprocess.Popen(["true"])
    owner.wait()
    record = SessionRecord(
        id=session_id,
        name="bench",
        owner_pid=owner.pid,
        owner_create_time=0.0,
        uid=os.getuid(),
        runtime_dir=str(runtime),
        bindspace=str(bindspace),
        port=None,
    )
    SessionStore(runtime).write(record)
    key, value = dump_rtvars(RuntimeVars(session=session_id))
    daemon = subprocess.Popen(
        ["setsid", "sleep", "600"], env={**os.environ, key: value}
    )

    rows = []
    started: list[subprocess.Popen[bytes]] = []
    try:
        for size in sizes:
            started += _sleepers(size - len(started))
            time.sleep(0.5)  # let every exec finish
            check_leaks(record)  # warm caches (pwd, psutil's process table)
            times = []
            for _ in range(repeat):
                report = check_leaks(record)
                times.append(report.duration)
            median = statistics.median(times)
            rows.append(
                (
                    size,
                    len(psutil.pids()),
                    median,
                    median / report.scanned * 1e6,
                    f"{len(report.processes)} proc, {len(report.sockets)} socket",
                )
            )
    finally:
        _stop([*started, daemon])
        live.close()
        shutil.rmtree(runtime, ignore_errors=True)

    table = Table(title=f"leak check, median of {repeat} ({os.cpu_count()} CPUs)")
    for header in ("idle processes", "on host", "median", "per process", "found"):
        table.add_column(header, justify="right")
    for size, host, median, per, found in rows:
        table.add_row(
            str(size), str(host), f"{median * 1000:.1f} ms", f"{per:.0f} µs", found
        )
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
