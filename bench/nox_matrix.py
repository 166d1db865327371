"""Wall time of this repository's test matrix under nox, run by run.

Runs, from the repository root:

- ``nox -j auto -t tests``: every session at once, virtualenvs rebuilt (nox's
  default);
- the same with ``-R``: virtualenvs reused, nothing installed;
- ``nox -R -t tests``: the sessions one after the other;
- two identical ``nox -R -s tests-trio-tcp`` started at the same moment.

``--quick`` (under a minute) times one session instead of the matrix. The
numbers depend on the machine and its load; print them with the load
average, as the table does.

    python bench/nox_matrix.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOX = str(Path(sys.executable).parent / "nox")


def timed(*commands: list[str]) -> tuple[float, list[int]]:
    """Start *commands* together; wall seconds until all end, and statuses."""
    env = {k: v for k, v in os.environ.items() if k != "_TRACTOR_RT_VARS"}
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for cmd in commands
    ]
    statuses = [proc.wait() for proc in procs]
    return time.perf_counter() - started, statuses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="one session, not the matrix"
    )
    args = parser.parse_args()

    select = ["-s", "tests-trio-tcp"] if args.quick else ["-t", "tests"]
    cases = [
        ("all at once, venvs rebuilt", [[NOX, "-j", "auto", *select]]),
        ("all at once, venvs reused (-R)", [[NOX, "-j", "auto", "-R", *select]]),
        ("one after another (-R)", [[NOX, "-R", *select]]),
        (
            "2 identical tests-trio-tcp at once (-R)",
            [[NOX, "-R", "-s", "tests-trio-tcp"]] * 2,
        ),
    ]
    if args.quick:
        cases = [cases[0], cases[1], cases[3]]

    # Warm up: virtualenvs exist, so "reused" means reused.
    timed([NOX, "-j", "auto", *select])

    rows = []
    for label, commands in cases:
        seconds, statuses = timed(*commands)
        rows.append((label, seconds, statuses))

    load = os.getloadavg()[0]
    print(f"nox matrix of {REPO} ({os.cpu_count()} CPUs, load {load:.1f})")
    print(f"{'case':<42} {'wall s':>7}  exit statuses")
    for label, seconds, statuses in rows:
        print(f"{label:<42} {seconds:7.1f}  {statuses}")
    return 0 if all(s == 0 for _, _, st in rows for s in st) else 1


if __name__ == "__main__":
    sys.exit(main())
