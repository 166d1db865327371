"""What ``harness exec -- true`` costs on top of ``true``.

Runs each command N times, one after the other, and prints the median,
the fastest and the 90th percentile of the wall-clock time, like hyperfine
does. The rows build up the cost step by step:

- ``true``: starting a process at all;
- ``python -c pass``: the interpreter of the venv starting;
- ``python -c 'import harness.cli'`` plus the verb modules: imports;
- ``harness --version``: the CLI with every verb registered;
- ``harness exec -- true``: a whole session (lease, bindspace, envelope,
  record, run, close).

Wall-clock times on a shared machine move with its load (shown in the
title); the ``cpu`` column (user + system time of the command and what it
waited for, median) is the steadier figure.

    python bench/exec_overhead.py [--quick] [--runs N] [--importtime]

``--importtime`` also lists the slowest imports of ``harness exec`` (from
``python -X importtime``). Everything runs under a private
``$HARNESS_RUNTIME_DIR``, removed at the end.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _time(argv: list[str], runs: int, env: dict[str, str]) -> tuple[list[float], float]:
    """Wall-clock samples, and the median CPU time (user + system) per run.

    CPU time counts the command and every descendant it waited for; unlike
    wall-clock time it barely moves when other work shares the machine.
    """
    # One warm-up run: fills the page cache and writes the bytecode cache.
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    samples, cpu = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
        samples.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return samples, statistics.median(cpu)


def _p90(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def _slowest_imports(python: str, env: dict[str, str], count: int = 12) -> list[str]:
    done = subprocess.run(
        [python, "-X", "importtime", "-m", "harness", "exec", "--", "true"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    rows = []
    for line in done.stderr.splitlines():
        # "import time: <self us> | <cumulative us> | <module>"
        if not line.startswith("import time:"):
            continue
        own, total, name = line.removeprefix("import time:").split("|", 2)
        if own.strip().isdigit():
            rows.append((int(total), int(own), name.strip()))
    rows.sort(reverse=True)
    return [
        f"{total / 1000:7.1f} ms cumulative {own / 1000:6.1f} ms self  {name}"
        for total, own, name in rows[:count]
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer runs: under a minute"
    )
    parser.add_argument("--runs", type=int, default=None, help="runs per command")
    parser.add_argument(
        "--importtime", action="store_true", help="list the slowest imports of exec"
    )
    parser.add_argument(
        "--no-bytecode-cache",
        action="store_true",
        help="run with PYTHONDONTWRITEBYTECODE=1 (every import compiles)",
    )
    args = parser.parse_args()
    runs = args.runs or (15 if args.quick else 50)

    python = sys.executable
    entry = Path(python).with_name("harness")
    harness = [str(entry)] if entry.exists() else [python, "-m", "harness"]
    runtime = Path(tempfile.mkdtemp(prefix="hbench-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "_TRACTOR_RT_VARS"}
    # Measure what users get: with the bytecode cache, unless asked not to.
    no_bytecode = args.no_bytecode_cache
    if no_bytecode:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    else:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["HARNESS_RUNTIME_DIR"] = str(runtime)
    rows = [
        ("true", ["true"]),
        ("python -c pass", [python, "-c", "pass"]),
        (
            "python: import the CLI",
            [python, "-c", "import harness.cli as c; c.build_parser()"],
        ),
        ("harness --version", [*harness, "--version"]),
        ("harness exec -- true", [*harness, "exec", "--", "true"]),
    ]
    results = []
    try:
        for label, argv in rows:
            samples, cpu = _time(argv, runs, env)
            results.append((label, samples, cpu))
        imports = _slowest_imports(python, env) if args.importtime else []
    finally:
        shutil.rmtree(runtime, ignore_errors=True)

    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=(
            f"{runs} runs each, {os.cpu_count()} CPUs, "
            f"Python {sys.version.split()[0]}, load {os.getloadavg()[0]:.1f}, "
            f"bytecode cache {'off' if no_bytecode else 'on'}"
        ),
        title_justify="left",
        box=None,
        pad_edge=False,
        header_style="bold",
    )
    for column in ("command", "median", "min", "p90", "over true", "cpu"):
        table.add_column(column, justify="left" if column == "command" else "right")
    base = statistics.median(results[0][1])
    for label, samples, cpu in results:
        median = statistics.median(samples)
        table.add_row(
            label,
            f"{median * 1000:.1f} ms",
            f"{min(samples) * 1000:.1f} ms",
            f"{_p90(samples) * 1000:.1f} ms",
            f"{(median - base) * 1000:+.1f} ms",
            f"{cpu * 1000:.1f} ms",
        )
    console = Console(highlight=False)
    console.print(table)
    if imports:
        console.print("\nslowest imports of `harness exec -- true`:")
        for line in imports:
            console.print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
