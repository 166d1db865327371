"""Port leases against the port pickers a test suite would otherwise use.

Allocators, measured in one run on one machine:

- ``harness``: `harness.ports.lease_port`, in a private lease dir;
- ``portpicker + portserver``: `portpicker.pick_unused_port` with
  ``$PORTSERVER_ADDRESS`` pointing at a ``portserver.py`` that this script
  starts from the portpicker package, on a Unix socket in a private folder;
- ``portpicker``: the same call without a portserver;
- ``ephemeral-port-reserve``: ``reserve()``, which leaves the port in TIME_WAIT;
- ``port-for``: ``select_random()``;
- ``kernel port 0``: bind port 0, note the port, close: the naive baseline.

Three figures per allocator:

1. leases per second in one process, every port kept until the end (a lease
   is released, a picked number forgotten, only after the loop);
2. duplicates when P processes (behind a barrier) take L ports each and
   *pass the numbers on*: every process picks all of its ports first, and
   binds them only once every process has picked, as a child started with
   the number would;
3. duplicates when each process *binds at once* what it got and keeps it
   listening.

A duplicate is a port handed to a second holder while the first still held
it; a bind failure is a holder that could not bind the port it was handed.
Every socket is on 127.0.0.1; the portserver serves 15000-19999, the harness
leases from its default range (below the kernel's ephemeral range), so the
two never hand out the same numbers.

    python bench/leases.py           # 32 processes x 50 ports, 3 rounds
    python bench/leases.py --quick   # 16 x 25, 1 round: under a minute

Needs the ``bench`` extra: ``pip install -e '.[bench]'``. An allocator that is
not installed gets a row that says so, and the run carries on. Exit status 0
when the harness handed out no duplicate in either mode and leased at least
as fast as portpicker with its portserver, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _table import console, machine_line, median, table

#: The ports the portserver hands out: clear of the harness's default range.
PORTSERVER_POOL = (15000, 19999)

ALLOCATORS = (
    "harness",
    "portpicker + portserver",
    "portpicker",
    "ephemeral-port-reserve",
    "port-for",
    "kernel port 0",
)

#: The distribution to install for each anchor, for the "not installed" row.
DISTRIBUTIONS = {
    "portpicker + portserver": "portpicker",
    "portpicker": "portpicker",
    "ephemeral-port-reserve": "ephemeral-port-reserve",
    "port-for": "port-for",
}

#: Seconds a worker waits at a barrier before it gives up on the others.
BARRIER_TIMEOUT = 300.0

Picker = Callable[[], tuple[int, Callable[[], None]]]


@dataclass
class Setting:
    """Where the allocators get their ports from, for one run."""

    lease_dir: Path
    portserver: str | None = None
    """The portserver's socket path, once it runs."""


def _forget() -> None:
    """Releasing a picked number: nothing to do, nobody holds it."""


def make_picker(name: str, setting: Setting) -> Picker:
    """The allocator *name* as one call: ``() -> (port, release)``.

    Raises ImportError when the anchor is not installed, RuntimeError when
    the portserver is not running.
    """
    if name == "harness":
        from harness.ports import lease_port

        def harness() -> tuple[int, Callable[[], None]]:
            lease = lease_port(lease_dir=setting.lease_dir)
            return lease.port, lease.release

        return harness

    if name in ("portpicker", "portpicker + portserver"):
        import portpicker

        if name == "portpicker":
            os.environ.pop("PORTSERVER_ADDRESS", None)
        else:
            if setting.portserver is None:
                msg = "the portserver did not start"
                raise RuntimeError(msg)
            os.environ["PORTSERVER_ADDRESS"] = setting.portserver

        def pick_portpicker() -> tuple[int, Callable[[], None]]:
            return int(portpicker.pick_unused_port()), _forget

        return pick_portpicker

    if name == "ephemeral-port-reserve":
        import ephemeral_port_reserve

        def pick_epr() -> tuple[int, Callable[[], None]]:
            return int(ephemeral_port_reserve.reserve("127.0.0.1")), _forget

        return pick_epr

    if name == "port-for":
        import port_for

        def pick_port_for() -> tuple[int, Callable[[], None]]:
            return int(port_for.select_random()), _forget

        return pick_port_for

    if name == "kernel port 0":

        def pick_kernel() -> tuple[int, Callable[[], None]]:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                return int(sock.getsockname()[1]), _forget

        return pick_kernel

    msg = f"unknown allocator {name!r}; choose one of {', '.join(ALLOCATORS)}"
    raise ValueError(msg)


def _bind_and_keep(port: int, kept: list[socket.socket]) -> bool:
    """Bind and listen on 127.0.0.1:*port* as a registry would; keep it."""
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
    except OSError:
        sock.close()
        return False
    kept.append(sock)
    return True


# ---------------------------------------------------------------- contention


def _holder(
    *,
    name: str,
    setting: Setting,
    mode: str,
    count: int,
    start: Barrier,
    picked: Barrier,
    done: Barrier,
    results: Any,
) -> None:
    """One holder: take *count* ports, bind them (at once or later), report."""
    handed: list[int] = []
    releases: list[Callable[[], None]] = []
    kept: list[socket.socket] = []
    failures = 0
    error = None
    try:
        pick = make_picker(name, setting)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    start.wait(BARRIER_TIMEOUT)
    if error is None:
        try:
            for _ in range(count):
                port, release = pick()
                handed.append(port)
                releases.append(release)
                if mode == "bound" and not _bind_and_keep(port, kept):
                    failures += 1
        except Exception as exc:  # reported in the row, never hidden
            error = f"{type(exc).__name__}: {exc}"
    # Passing numbers on: nobody binds before every holder has its numbers.
    picked.wait(BARRIER_TIMEOUT)
    if mode == "numbers":
        failures += sum(not _bind_and_keep(port, kept) for port in handed)
    results.put({"ports": handed, "failures": failures, "error": error})
    # Everything stays held until the parent has every holder's report.
    done.wait(BARRIER_TIMEOUT)
    for release in releases:
        release()
    for sock in kept:
        sock.close()


@dataclass
class Contention:
    """What one contention round of one allocator found."""

    handed: int = 0
    duplicates: int = 0
    failures: int = 0
    errors: list[str] = field(default_factory=list)


def contention(
    name: str, setting: Setting, mode: str, processes: int, count: int
) -> Contention:
    """*processes* holders of *count* ports each, all at once, in *mode*."""
    ctx = mp.get_context("fork")
    start = ctx.Barrier(processes)
    picked = ctx.Barrier(processes)
    done = ctx.Barrier(processes + 1)
    results = ctx.Queue()
    holders = [
        ctx.Process(
            target=_holder,
            kwargs={
                "name": name,
                "setting": setting,
                "mode": mode,
                "count": count,
                "start": start,
                "picked": picked,
                "done": done,
                "results": results,
            },
        )
        for _ in range(processes)
    ]
    for holder in holders:
        holder.start()
    reports = [results.get(timeout=BARRIER_TIMEOUT) for _ in holders]
    done.wait(BARRIER_TIMEOUT)
    for holder in holders:
        holder.join(timeout=60)

    ports = Counter(port for report in reports for port in report["ports"])
    return Contention(
        handed=sum(ports.values()),
        duplicates=sum(n - 1 for n in ports.values() if n > 1),
        failures=sum(report["failures"] for report in reports),
        errors=sorted({report["error"] for report in reports if report["error"]}),
    )


# ---------------------------------------------------------------- throughput


def _throughput_worker(
    name: str, setting: Setting, count: int, seconds: float, results: Any
) -> None:
    try:
        pick = make_picker(name, setting)
        releases = []
        began = time.perf_counter()
        deadline = began + seconds
        while len(releases) < count and time.perf_counter() < deadline:
            releases.append(pick()[1])
        elapsed = time.perf_counter() - began
        for release in releases:
            release()
        results.put({"rate": len(releases) / elapsed, "error": None})
    except Exception as exc:
        results.put({"rate": None, "error": f"{type(exc).__name__}: {exc}"})


def throughput(name: str, setting: Setting, count: int, seconds: float) -> float:
    """Leases a second in one fresh process: up to *count* ports, all held,
    or as many as *seconds* allow. Raises RuntimeError with the worker's
    error."""
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    worker = ctx.Process(
        target=_throughput_worker, args=(name, setting, count, seconds, results)
    )
    worker.start()
    report = results.get(timeout=BARRIER_TIMEOUT)
    worker.join(timeout=60)
    if report["error"]:
        raise RuntimeError(report["error"])
    return float(report["rate"])


# ---------------------------------------------------------------- portserver


@contextlib.contextmanager
def portserver(folder: Path) -> Any:
    """Run portpicker's ``portserver.py`` on a Unix socket in *folder*.

    Yields the socket path, or None (and a reason on stderr) when the
    portserver is not installed or does not come up within 10 s.
    """
    script = shutil.which("portserver.py", path=str(Path(sys.executable).parent))
    if script is None:
        print("portserver.py not found beside this Python", file=sys.stderr)
        yield None
        return
    address = str(folder / "portserver.sock")
    log = (folder / "portserver.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            script,
            "--portserver_address",
            address,
            "--portserver_static_pool",
            f"{PORTSERVER_POOL[0]}-{PORTSERVER_POOL[1]}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(address) and proc.poll() is None:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if not os.path.exists(address):
            print(f"the portserver did not start; see {log.name}", file=sys.stderr)
            yield None
        else:
            yield address
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# ---------------------------------------------------------------- the run


@dataclass
class Row:
    name: str
    rates: list[float] = field(default_factory=list)
    numbers: list[Contention] = field(default_factory=list)
    bound: list[Contention] = field(default_factory=list)
    note: str = ""

    def duplicates(self, mode: str) -> int:
        runs = self.numbers if mode == "numbers" else self.bound
        return sum(c.duplicates for c in runs)

    def failures(self, mode: str) -> int:
        runs = self.numbers if mode == "numbers" else self.bound
        return sum(c.failures for c in runs)

    def errors(self) -> list[str]:
        return sorted({e for c in (*self.numbers, *self.bound) for e in c.errors})


def measure(
    name: str,
    setting: Setting,
    *,
    rounds: int,
    processes: int,
    count: int,
    loops: int,
    seconds: float,
) -> Row:
    row = Row(name)
    try:
        make_picker(name, setting)
    except ImportError:
        dist = DISTRIBUTIONS.get(name, name)
        row.note = f"not installed: pip install {dist} (or the bench extra)"
        return row
    except RuntimeError as exc:
        row.note = f"cannot run: {exc}"
        return row
    for _ in range(rounds):
        try:
            row.rates.append(throughput(name, setting, loops, seconds))
        except RuntimeError as exc:
            row.note = f"throughput: {exc}"
        row.numbers.append(contention(name, setting, "numbers", processes, count))
        row.bound.append(contention(name, setting, "bound", processes, count))
    errors = row.errors()
    if errors:
        row.note = "; ".join([row.note, *errors] if row.note else errors)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit status 0 when the harness shows 0 duplicates and at least "
        "the throughput of portpicker with its portserver, 1 otherwise.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="16 x 25, one round: under a minute"
    )
    parser.add_argument("--processes", type=int, help="holders at once (32)")
    parser.add_argument("--leases", type=int, help="ports per holder (50)")
    parser.add_argument("--rounds", type=int, help="rounds of everything (3)")
    parser.add_argument(
        "--only",
        action="append",
        choices=ALLOCATORS,
        help="measure only this allocator (repeatable)",
    )
    args = parser.parse_args()
    processes = args.processes or (16 if args.quick else 32)
    count = args.leases or (25 if args.quick else 50)
    rounds = args.rounds or (1 if args.quick else 3)
    loops, seconds = (1000, 1.5) if args.quick else (2000, 5.0)
    names = args.only or list(ALLOCATORS)

    out = console()
    out.print(f"Port allocators on {machine_line()}")
    out.print(
        f"{processes} processes x {count} ports, {rounds} round(s); throughput: "
        f"up to {loops} ports held in one process or {seconds:g} s\n"
    )
    folder = Path(tempfile.mkdtemp(prefix="hbench-leases-", dir="/tmp"))
    rows = []
    try:
        with portserver(folder) as address:
            setting = Setting(lease_dir=folder / "leases", portserver=address)
            for name in names:
                rows.append(
                    measure(
                        name,
                        setting,
                        rounds=rounds,
                        processes=processes,
                        count=count,
                        loops=loops,
                        seconds=seconds,
                    )
                )
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    handed = processes * count * rounds
    result = table(
        f"Leases: {handed} per mode; duplicates = ports handed to a second "
        "holder while the first held them",
        [
            "allocator",
            "leases/s",
            "numbers: dup",
            "numbers: bind fail",
            "bound: dup",
            "bound: bind fail",
            "note",
        ],
        right=[
            "leases/s",
            "numbers: dup",
            "numbers: bind fail",
            "bound: dup",
            "bound: bind fail",
        ],
    )
    for row in rows:
        measured = bool(row.numbers)
        result.add_row(
            row.name,
            f"{median(row.rates):,.0f}" if row.rates else "-",
            str(row.duplicates("numbers")) if measured else "-",
            str(row.failures("numbers")) if measured else "-",
            str(row.duplicates("bound")) if measured else "-",
            str(row.failures("bound")) if measured else "-",
            row.note,
        )
    out.print(result)
    out.print(
        "numbers: every holder picks all its ports, then binds them (a number "
        "passed to a child); bound: each port is bound and kept as soon as it "
        "is handed out."
    )
    return _verdict(rows, out)


def _verdict(rows: list[Row], out: Any) -> int:
    by_name = {row.name: row for row in rows}
    ours = by_name.get("harness")
    if ours is None or not ours.numbers:
        return 0
    unique = (
        ours.duplicates("numbers") == 0
        and ours.duplicates("bound") == 0
        and ours.failures("numbers") == 0
        and ours.failures("bound") == 0
        and not ours.errors()
    )
    out.print(
        ("[green]met[/green]" if unique else "[red]MISSED[/red]")
        + ": the harness handed out no duplicate and every port bound"
    )
    server = by_name.get("portpicker + portserver")
    if server is None or not server.rates:
        return 0 if unique else 1
    fast = median(ours.rates) >= median(server.rates)
    ratio = median(ours.rates) / median(server.rates)
    out.print(
        ("[green]met[/green]" if fast else "[red]MISSED[/red]")
        + f": the harness leased {ratio:.1f}x as fast as portpicker with its "
        "portserver"
    )
    return 0 if unique and fast else 1


if __name__ == "__main__":
    sys.exit(main())
