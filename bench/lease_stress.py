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

    python bench/lease_stress.py            # 32 processes x 50 leases, 10,000 loops
    python bench/lease_stress.py --quick    # 16 x 50, 3,000 loops: well under a minute
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


def _worker(
    index: int,
    leases: int,
    directory: str,
    start: Barrier,
    done: Barrier,
    results: Any,
) -> None:
    """Lease *leases* ports, prove each binds, report, hold until all reported."""
    held = []
    latencies = []
    error = None
    start.wait()
    began = time.perf_counter()
    try:
        for _ in range(leases):
            t0 = time.perf_counter()
            held.append(lease_port(lease_dir=Path(directory)))
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
            "index": index,
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
    processes: int, leases: int, directory: Path, method: str
) -> dict[str, Any]:
    ctx = mp.get_context(method)
    start = ctx.Barrier(processes)
    done = ctx.Barrier(processes + 1)
    results = ctx.Queue()
    workers = [
        ctx.Process(
            target=_worker,
            args=(i, leases, str(directory), start, done, results),
        )
        for i in range(processes)
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


def throughput(loops: int, directory: Path) -> dict[str, float]:
    # Warm up: create the lock files once, as a long-lived lease dir has them.
    for _ in range(min(loops, 500)):
        lease_port(lease_dir=directory).release()
    t0 = time.perf_counter()
    for _ in range(loops):
        lease_port(lease_dir=directory).release()
    elapsed = time.perf_counter() - t0
    return {"loops": loops, "elapsed": elapsed, "rate": loops / elapsed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a run under a minute")
    parser.add_argument("--processes", type=int, help="concurrent processes")
    parser.add_argument("--leases", type=int, default=50, help="leases per process")
    parser.add_argument("--loops", type=int, help="lease+release loops for throughput")
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
    processes = args.processes or (16 if args.quick else 32)
    loops = args.loops or (3000 if args.quick else 10000)

    private = None
    if args.shared:
        directory = lease_dir()
    else:
        private = Path(tempfile.mkdtemp(prefix="lease-bench-", dir="/tmp"))
        directory = private / "leases"
    console = Console()
    low, high = configured_port_range()
    console.print(
        f"lease dir {directory}, ports {low}-{high}, {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}, workers start by {args.start_method}"
    )
    try:
        lease_port(lease_dir=directory).release()  # creates and checks it
        c = contention(processes, args.leases, directory, args.start_method)
        t = throughput(loops, directory)
    finally:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)

    table = Table(title="Concurrent leases, all held at once", title_justify="left")
    for column in ("processes", "leases each", "granted", "distinct", "duplicates"):
        table.add_column(column, justify="right")
    for column in ("unbindable", "wall s", "slowest proc s", "p50 ms", "p99 ms"):
        table.add_column(column, justify="right")
    table.add_row(
        str(c["processes"]),
        str(c["leases"]),
        str(c["granted"]),
        str(c["distinct"]),
        str(c["duplicates"]),
        str(c["unbindable"]),
        f"{c['wall']:.2f}",
        f"{c['slowest']:.2f}",
        f"{c['p50'] * 1e3:.2f}",
        f"{c['p99'] * 1e3:.2f}",
    )
    console.print(table)
    for error in c["errors"]:
        console.print(f"[red]worker error:[/red] {error}")

    table = Table(title="Lease + release in one process", title_justify="left")
    for column in ("loops", "seconds", "leases/s"):
        table.add_column(column, justify="right")
    table.add_row(str(t["loops"]), f"{t['elapsed']:.2f}", f"{t['rate']:,.0f}")
    console.print(table)

    ok = (
        c["duplicates"] == 0
        and c["unbindable"] == 0
        and not c["errors"]
        and c["granted"] == c["processes"] * c["leases"]
    )
    console.print(
        "[green]targets met: 0 duplicates, every port bindable[/green]"
        if ok
        else "[red]targets missed[/red]",
        f"; throughput {t['rate']:,.0f}/s (target 1,000/s)",
    )
    return 0 if ok and t["rate"] >= 1000 else 1


if __name__ == "__main__":
    sys.exit(main())
