"""What a session pays to start in private namespaces (harness.isolate).

Runs ``true`` many times each way and prints the median and 90th percentile
wall time, from starting the process to having its status (and, for the
isolated cases, the plan's `started` and `teardown` included, as a session
runner does them):

- plain:            ``true``, no isolation;
- python -I -S:     an empty interpreter start, the floor under nsinit;
- unshare -n:       util-linux, for comparison (root only: no loopback set up);
- isolate net:      ``--isolate net``: new network namespace, loopback up;
- isolate pid:      ``--isolate pid``: net + pid namespace + own /proc, init
                    held until teardown;
- ... as nobody:    the same through an unprivileged user namespace, when the
                    benchmark runs as root and ``/usr/bin/python3`` exists
                    (the ``--user`` rows; skipped otherwise).

The cases take turns, so a noisy neighbour on the machine slows all of them
alike instead of one.

    python bench/namespace_cost.py            # 60 rounds
    python bench/namespace_cost.py --quick    # 15 rounds: well under a minute
    python bench/namespace_cost.py --python ~/.pyenv/versions/3.13.0/bin/python

The "as nobody" rows always run nsinit on /usr/bin/python3.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from harness import isolate

Case = Callable[[], None]


def plain() -> None:
    subprocess.run(["true"], check=True)


def python_floor(python: str) -> None:
    subprocess.run([python, "-I", "-S", "-c", "pass"], check=True)


def unshare_binary() -> None:
    subprocess.run(["unshare", "-n", "true"], check=True)


def isolated(level: str, caps: isolate.Capabilities, python: str) -> Case:
    def run() -> None:
        plan = isolate.plan(level, capabilities=caps, python=python)
        proc = subprocess.Popen(plan.wrap(["true"]))
        plan.started(proc)
        if proc.wait() != 0:
            msg = f"isolate {level}: `true` failed with status {proc.returncode}"
            raise RuntimeError(msg)
        plan.teardown()

    return run


_NOBODY_LOOP = """
import subprocess, sys, time
from harness import isolate
caps = isolate.detect()
for _ in range({rounds}):
    plan = isolate.plan({level!r}, capabilities=caps)
    t = time.perf_counter()
    proc = subprocess.Popen(plan.wrap(["true"]))
    plan.started(proc)
    proc.wait()
    plan.teardown()
    print((time.perf_counter() - t) * 1000, flush=True)
"""


def as_nobody(level: str, rounds: int) -> list[float] | None:
    """Times of *rounds* runs as the user nobody, measured in that process."""
    if os.geteuid() != 0 or not os.access("/usr/bin/python3", os.X_OK):
        return None
    home = Path(tempfile.mkdtemp(prefix="hnb-", dir="/tmp"))
    os.chown(home, 65534, 65534)
    try:
        done = subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "/usr/bin/python3",
                "-c",
                _NOBODY_LOOP.format(rounds=rounds, level=level),
            ],
            env={
                "PATH": "/usr/bin:/bin",
                "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
                "HARNESS_RUNTIME_DIR": str(home),
            },
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        shutil.rmtree(home, ignore_errors=True)
    if done.returncode != 0:
        print(f"as nobody, {level}: failed: {done.stderr.strip()}", file=sys.stderr)
        return None
    return [float(line) for line in done.stdout.split()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="15 rounds, not 60")
    parser.add_argument("--rounds", type=int, help="rounds per case")
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="the interpreter that runs harness.nsinit (default: this one; "
        "Python >= 3.12 enters namespaces without ctypes)",
    )
    args = parser.parse_args()
    rounds = args.rounds or (15 if args.quick else 60)

    # Detection (with its one-off probe) is paid once per harness process,
    # not per session, so it stays out of the per-run numbers.
    caps = isolate.detect()
    cases: dict[str, Case] = {
        "plain true": plain,
        "python -I -S": lambda: python_floor(args.python),
    }
    if shutil.which("unshare") and caps.privileged:
        cases["unshare -n true"] = unshare_binary
    for level in caps.levels:
        cases[f"isolate {level}"] = isolated(level, caps, args.python)

    times: dict[str, list[float]] = {name: [] for name in cases}
    for case in cases.values():  # warm the page cache once
        case()
    for _ in range(rounds):
        for name, case in cases.items():
            start = time.perf_counter()
            case()
            times[name].append((time.perf_counter() - start) * 1000)
    for level in caps.levels if caps.privileged else ():
        measured = as_nobody(level, rounds)
        if measured:
            times[f"isolate {level} (as nobody)"] = measured

    base = statistics.median(times["plain true"])
    table = Table(
        title=f"Start-up cost of namespaces, {rounds} runs of `true` each "
        f"({os.cpu_count()} CPUs, nsinit on {args.python})",
        title_justify="left",
    )
    table.add_column("case")
    table.add_column("median ms", justify="right")
    table.add_column("p90 ms", justify="right")
    table.add_column("extra vs plain, ms", justify="right")
    for name, values in times.items():
        median = statistics.median(values)
        p90 = statistics.quantiles(values, n=10)[-1] if len(values) > 1 else median
        table.add_row(name, f"{median:.1f}", f"{p90:.1f}", f"{median - base:+.1f}")
    console = Console()
    console.print(table)
    console.print(
        f"mechanism here: {caps.mechanism}; see `python -m harness.isolate` for why"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
