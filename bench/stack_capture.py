"""How long a stack capture of a session takes, by method and process count.

Starts N blocked Python processes that called
`harness.faulthandler_hook.enable`, then times `harness.stacks.capture_stacks`
over all of them with py-spy and with the faulthandler signal alone, and
prints a table (median and worst of the repeats). Every process it starts is
killed at the end.

    python bench/stack_capture.py --quick     # 4 and 8 processes, < 1 minute
    python bench/stack_capture.py             # 4, 8 and 16 processes
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from harness.rtvars import RuntimeVars, dump_rtvars
from harness.stacks import capture_stacks, find_py_spy

BLOCKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from harness.faulthandler_hook import enable
    enable()
    Path(sys.argv[1]).touch()
    def block_here_bench():
        time.sleep(600)
    block_here_bench()
    """
)


def start_blockers(count: int, folder: Path) -> list[subprocess.Popen[bytes]]:
    bindspace = folder / "bindspace"
    bindspace.mkdir(mode=0o700, exist_ok=True)
    name, value = dump_rtvars(RuntimeVars(session="bench", bindspace=str(bindspace)))
    env = {**os.environ, name: value}
    procs = []
    for index in range(count):
        marker = folder / f"ready-{index}"
        procs.append(
            subprocess.Popen([sys.executable, "-c", BLOCKER, str(marker)], env=env)
        )
    deadline = time.monotonic() + 60
    while not all((folder / f"ready-{i}").exists() for i in range(count)):
        if time.monotonic() > deadline:
            msg = "the blocked processes did not start within 60 s"
            raise SystemExit(msg)
        time.sleep(0.05)
    return procs


def time_capture(
    procs: list[subprocess.Popen[bytes]], py_spy: str | None, repeats: int
) -> tuple[float, float, int]:
    times = []
    captured = 0
    for _ in range(repeats):
        started = time.perf_counter()
        results = capture_stacks([(p.pid, "bench") for p in procs], py_spy=py_spy)
        times.append(time.perf_counter() - started)
        captured = sum(1 for r in results if r.captured)
    return statistics.median(times), max(times), captured


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a run under a minute")
    args = parser.parse_args()
    counts = (4, 8) if args.quick else (4, 8, 16)
    repeats = 3 if args.quick else 5
    py_spy = find_py_spy()
    methods: list[tuple[str, str | None]] = [("faulthandler", None)]
    if py_spy is not None:
        methods.insert(0, ("py-spy", py_spy))

    table = Table(
        title=f"capture_stacks over N blocked processes ({repeats} repeats, "
        f"{os.cpu_count()} CPUs)",
        title_justify="left",
    )
    for column in ("processes", "method", "median s", "worst s", "captured"):
        table.add_column(column, justify="right" if column != "method" else "left")
    for count in counts:
        folder = Path(tempfile.mkdtemp(prefix="hbench-", dir="/tmp"))
        procs = start_blockers(count, folder)
        try:
            for label, spy in methods:
                median, worst, captured = time_capture(procs, spy, repeats)
                table.add_row(
                    str(count),
                    label,
                    f"{median:.2f}",
                    f"{worst:.2f}",
                    f"{captured}/{count}",
                )
        finally:
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
            shutil.rmtree(folder, ignore_errors=True)
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
