"""Wall time of this repository's test matrix, and what the harness adds to it.

Two tables, from the repository root, with the sessions' virtualenvs reused
(``nox -R``; the first run builds them if missing, untimed):

1. The matrix: the six ``tests-<backend>-<transport>`` sessions one after
   another (``nox -R -t tests``) against all at once (``nox -R -j auto -t
   tests``).
2. Per session, the same tests three ways, each in the session's own
   virtualenv: a bare ``pytest tests/integration --spawn-backend=B
   --tpt-proto=T`` (the pytest plugin opens a session in-process, since the
   tests need one), the same command under ``harness exec`` (a lease, a
   bindspace, an envelope, a leak check, in a process of its own) and ``nox
   -R -s <session>`` (nox, the virtualenv lock, ``harness exec``, reports).
   The overhead columns are the medians' differences to the bare run.

``--quick`` (under a minute): the matrix table for two sessions, the
per-session table for tests-trio-tcp only, one run each.

    python bench/matrix_walltime.py [--quick] [--repeat R]

Every run gets a private ``$HARNESS_RUNTIME_DIR``, so the sessions it opens
never mix with real ones.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _table import console, machine_line, median, table

REPO = Path(__file__).resolve().parents[1]
NOX = str(Path(sys.executable).parent / "nox")


def cells() -> list[tuple[str, str, str]]:
    """``(session, backend, transport)`` of every run of the matrix."""
    sys.path.insert(0, str(REPO))
    from harness.config import load_config
    from harness.matrix import Matrix

    matrix = Matrix(load_config(REPO / "pyproject.toml"))
    return [(cell.session, cell.backend, cell.transport) for cell in matrix]


def run(command: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and exit status of *command*, output discarded."""
    began = time.perf_counter()
    status = subprocess.run(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    ).returncode
    return time.perf_counter() - began, status


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="under a minute")
    parser.add_argument("--repeat", type=int, help="runs of each case (3; 1 quick)")
    args = parser.parse_args()
    repeat = args.repeat or (1 if args.quick else 3)

    every = cells()
    matrix_cells = every[:2] if args.quick else every
    session_cells = every[:1] if args.quick else every
    names = [name for name, _, _ in matrix_cells]
    # The whole matrix is selected by its tag, as a user would run it.
    select = ["-t", "tests"] if matrix_cells == every else ["-s", *names]

    runtime = Path(tempfile.mkdtemp(prefix="hbench-matrix-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k not in ("_TRACTOR_RT_VARS", "CI")}
    env["HARNESS_RUNTIME_DIR"] = str(runtime)
    out = console()
    failures: list[str] = []
    try:
        # Untimed: build whatever virtualenv is missing.
        missing = [n for n, _, _ in every if not (REPO / ".nox" / n / "bin").is_dir()]
        if missing:
            out.print(f"Building the virtualenvs of {', '.join(missing)} (untimed)...")
            run([NOX, "-j", "auto", "-s", *missing], env)

        serial: list[float] = []
        parallel: list[float] = []
        per_session: dict[str, dict[str, list[float]]] = {}
        for _ in range(repeat):
            for label, command, into in (
                ("serial", [NOX, "-R", *select], serial),
                ("parallel", [NOX, "-R", "-j", "auto", *select], parallel),
            ):
                seconds, status = run(command, env)
                into.append(seconds)
                if status:
                    failures.append(f"{label} matrix exited {status}")
            for name, backend, transport in session_cells:
                venv = REPO / ".nox" / name / "bin"
                pytest = [
                    str(venv / "pytest"),
                    "tests/integration",
                    f"--spawn-backend={backend}",
                    f"--tpt-proto={transport}",
                    "-p",
                    "no:cacheprovider",
                ]
                exec_ = [
                    str(venv / "python"),
                    "-m",
                    "harness",
                    "exec",
                    "--name",
                    name,
                    "--backend",
                    backend,
                    "--transport",
                    transport,
                    "--leaks",
                    "warn",
                    "--",
                    *pytest,
                ]
                times = per_session.setdefault(
                    name, {"bare": [], "exec": [], "nox": []}
                )
                for kind, command in (
                    ("bare", pytest),
                    ("exec", exec_),
                    ("nox", [NOX, "-R", "-s", name]),
                ):
                    seconds, status = run(command, env)
                    times[kind].append(seconds)
                    if status:
                        failures.append(f"{name} {kind} exited {status}")
    finally:
        shutil.rmtree(runtime, ignore_errors=True)

    out.print(f"Matrix wall time of {REPO} on {machine_line()}")
    out.print(f"{repeat} run(s) of each case; medians in seconds\n")
    matrix = table(
        f"The matrix: {len(names)} sessions, virtualenvs reused",
        ["case", "command", "wall s", "ratio"],
        right=["wall s", "ratio"],
    )
    one_by_one, at_once = median(serial), median(parallel)
    shown = " ".join(select)
    matrix.add_row("one after another", f"nox -R {shown}", f"{one_by_one:.1f}", "1.00")
    matrix.add_row(
        "all at once",
        f"nox -R -j auto {shown}",
        f"{at_once:.1f}",
        f"{at_once / one_by_one:.2f}",
    )
    out.print(matrix)

    sessions = table(
        "Per session: the same tests bare, under harness exec, and as a nox session",
        [
            "session",
            "bare pytest s",
            "harness exec s",
            "nox -R -s s",
            "exec overhead s",
            "nox overhead s",
        ],
        right=[
            "bare pytest s",
            "harness exec s",
            "nox -R -s s",
            "exec overhead s",
            "nox overhead s",
        ],
    )
    for name, times in per_session.items():
        bare, exec_s, nox_s = (median(times[k]) for k in ("bare", "exec", "nox"))
        sessions.add_row(
            name,
            f"{bare:.2f}",
            f"{exec_s:.2f}",
            f"{nox_s:.2f}",
            f"{exec_s - bare:+.2f}",
            f"{nox_s - bare:+.2f}",
        )
    out.print(sessions)
    for failure in failures:
        out.print(f"[red]failed:[/red] {failure}")
    if failures:
        out.print(
            "A failing run's time is not comparable; run the session alone "
            "(nox -R -s NAME) to see why."
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
