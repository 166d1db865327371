"""Stress and speed of host-wide port leases (harness.ports).

Two measurements, printed as tables:

1. Uniqueness under contention: P processes start together behind a barrier,
   each leases L ports and holds all of them until every process has
   reported; each process also binds and listens on every port it holds.
   The parent counts ports granted twice (the target is 0) and ports their
   holder could not bind (also 0).
2. Throughput: lease + release in a loop in one process (target >= 1,000 a
   second on a 2-core machine).

The leases come from a private lease dir in /tmp unless ``--shared`` asks for
the host-wide one, so the run never competes with real sessions for ports.

    python bench/lease_stress.py          # 3 rounds of 32 x 50, baseline, 10k loops
    python bench/lease_stress.py --quick  # 1 round of 32 x 50, 3k loops: < 1 minute
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from harness.ports import configured_port_range, lease_dir, lease_port


class _KernelPick:
    """The naive way, for comparison: bind port 0, note the port, close."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.address = ("127.0.0.1", self.port)

    def release(self) -> None:
        pass


def _worker(
    *,
    leases: int,
    directory: str,
    naive: bool,
    start: Barrier,
    done: Barrier,
    results: Any,
) -> None:
    """Lease *leases* ports, prove each binds, report, hold until all reported."""
    held: list[Any] = []
    latencies = []
    error = None
    start.wait()
    began = time.perf_counter()
    try:
        for _ in range(leases):
            t0 = time.perf_counter()
            held.append(
                _KernelPick() if naive else lease_port(lease_dir=Path(directory))
            )
            latencies.append(time.perf_counter() - t0)
    except Exception as exc:  # reported to the parent, which prints it
        error = f"{type(exc).__name__}: {exc}"
    elapsed = time.perf_counter() - began

    # The holder must be able to bind what it was granted, as a registry
    # would: SO_REUSEADDR, then listen.
    unbindable = []
    for lease in held:
        sock = socket.socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(lease.address)
            sock.listen()
        except OSError as exc:
            unbindable.append((lease.port, exc.strerror))
        finally:
            sock.close()

    results.put(
        {
            "pid": os.getpid(),
            "ports": [lease.port for lease in held],
            "latencies": latencies,
            "elapsed": elapsed,
            "unbindable": unbindable,
            "error": error,
        }
    )
    # Keep every lease until all processes have reported theirs.
    done.wait()
    for lease in held:
        lease.release()


def contention(
    processes: int, leases: int, directory: Path, method: str, *, naive: bool = False
) -> dict[str, Any]:
    ctx = mp.get_context(method)
    start = ctx.Barrier(processes)
    done = ctx.Barrier(processes + 1)
    results = ctx.Queue()
    workers = [
        ctx.Process(
            target=_worker,
            kwargs={
                "leases": leases,
                "directory": str(directory),
                "naive": naive,
                "start": start,
                "done": done,
                "results": results,
            },
        )
        for _ in range(processes)
    ]
    t0 = time.perf_counter()
    for worker in workers:
        worker.start()
    reports = [results.get(timeout=300) for _ in workers]
    wall = time.perf_counter() - t0
    done.wait(timeout=60)
    for worker in workers:
        worker.join(timeout=60)

    ports = Counter(port for report in reports for port in report["ports"])
    latencies = sorted(x for report in reports for x in report["latencies"])
    return {
        "processes": processes,
        "leases": leases,
        "granted": sum(ports.values()),
        "distinct": len(ports),
        "duplicates": sum(n - 1 for n in ports.values() if n > 1),
        "unbindable": sum(len(report["unbindable"]) for report in reports),
        "errors": [report["error"] for report in reports if report["error"]],
        "wall": wall,
        "slowest": max(report["elapsed"] for report in reports),
        "p50": statistics.median(latencies) if latencies else float("nan"),
        "p99": latencies[int(len(latencies) * 0.99)] if latencies else float("nan"),
    }


def _loop(loops: int, directory: Path) -> float:
    t0 = time.perf_counter()
    for _ in range(loops):
        lease_port(lease_dir=directory).release()
    return loops / (time.perf_counter() - t0)


def throughput(loops: int, fresh: Path | None, warm: Path) -> dict[str, float]:
    """Leases a second: in a *fresh* lease dir, and in a *warm* one.

    In a fresh dir most leases create their lock file, which costs what the
    disk makes it cost; a long-lived host-wide dir holds a lock file for
    every port of the range, the state *warm* is brought to first.
    """
    rates = {}
    if fresh is not None:
        rates["fresh"] = _loop(loops, fresh)
    low, high = configured_port_range()
    for port in range(low, high + 1):
        path = warm / f"{port}.lock"
        if not path.exists():
            os.close(os.open(path, os.O_RDONLY | os.O_CREAT, 0o644))
    rates["warm"] = _loop(loops, warm)
    return rates


def _contention_table(title: str, runs: list[dict[str, Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("run", justify="right")
    table.add_column("procs x leases", justify="right")
    table.add_column("distinct", justify="right")
    table.add_column("dupes", justify="right")
    table.add_column("unbindable", justify="right")
    table.add_column("wall s", justify="right")
    table.add_column("p50 ms", justify="right")
    table.add_column("p99 ms", justify="right")
    for number, c in enumerate(runs, 1):
        table.add_row(
            str(number),
            f"{c['processes']} x {c['leases']}",
            f"{c['distinct']}/{c['granted']}",
            str(c["duplicates"]),
            str(c["unbindable"]),
            f"{c['wall']:.2f}",
            f"{c['p50'] * 1e3:.2f}",
            f"{c['p99'] * 1e3:.2f}",
        )
    return table


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Exit status 0 when every target is met, 1 otherwise.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="one round and fewer loops: under a minute"
    )
    parser.add_argument(
        "--processes", type=int, default=32, help="concurrent processes (32)"
    )
    parser.add_argument(
        "--leases", type=int, default=50, help="leases per process (50)"
    )
    parser.add_argument(
        "--rounds", type=int, help="contention rounds (3, or 1 with --quick)"
    )
    parser.add_argument(
        "--loops", type=int, help="lease+release loops (10,000, or 3,000 with --quick)"
    )
    parser.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run the naive picker (bind port 0, close) in the same shape "
        "(default: on, off with --quick)",
    )
    parser.add_argument(
        "--start-method",
        choices=mp.get_all_start_methods(),
        default="spawn",
        help="how worker processes start (default: spawn, fresh interpreters)",
    )
    parser.add_argument(
        "--shared",
        action="store_true",
        help="use the host-wide lease dir instead of a private one",
    )
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    loops = args.loops or (3000 if args.quick else 10000)
    baseline = (not args.quick) if args.baseline is None else args.baseline

    private = None
    if args.shared:
        directory = lease_dir()
    else:
        private = Path(tempfile.mkdtemp(prefix="lease-bench-", dir="/tmp"))
        directory = private / "leases"
    console = Console()
    low, high = configured_port_range()
    console.print(
        f"lease dir {directory}\nports {low}-{high}, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.2f}, Python {sys.version.split()[0]}, "
        f"workers start by {args.start_method}\n"
    )
    naive: list[dict[str, Any]] = []
    try:
        lease_port(lease_dir=directory).release()  # creates and checks it
        runs = [
            contention(args.processes, args.leases, directory, args.start_method)
            for _ in range(rounds)
        ]
        if baseline:
            naive = [
                contention(
                    args.processes,
                    args.leases,
                    directory,
                    args.start_method,
                    naive=True,
                )
                for _ in range(rounds)
            ]
        fresh = None if private is None else private / "fresh"
        if fresh is not None:
            lease_port(lease_dir=fresh).release()
        t = throughput(loops, fresh, directory)
    finally:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)

    console.print(_contention_table("harness.ports.lease_port, all held at once", runs))
    for c in runs:
        for error in c["errors"]:
            console.print(f"[red]worker error:[/red] {error}")
    if naive:
        console.print(
            _contention_table("naive picker for comparison: bind port 0, close", naive)
        )

    table = Table(title="lease + release in one process", title_justify="left")
    table.add_column("lease dir")
    table.add_column("loops", justify="right")
    table.add_column("leases/s", justify="right")
    if "fresh" in t:
        table.add_row(
            "fresh: most leases create their lock file",
            str(loops),
            f"{t['fresh']:,.0f}",
        )
    table.add_row(
        "warm: a lock file for every port exists", str(loops), f"{t['warm']:,.0f}"
    )
    console.print(table)

    unique = all(
        c["duplicates"] == 0
        and c["unbindable"] == 0
        and not c["errors"]
        and c["granted"] == c["processes"] * c["leases"]
        for c in runs
    )
    fast = t["warm"] >= 1000
    console.print(
        ("[green]met[/green]" if unique else "[red]MISSED[/red]")
        + ": 0 duplicates, every port bindable by its holder",
    )
    console.print(
        ("[green]met[/green]" if fast else "[red]MISSED[/red]")
        + f": >= 1,000 leases/s in a warm lease dir (measured {t['warm']:,.0f}/s)",
    )
    return 0 if unique and fast else 1


if __name__ == "__main__":
    sys.exit(main())
