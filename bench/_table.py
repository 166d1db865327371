"""What every comparison bench prints: the machine it ran on, and its tables.

Absolute figures depend on the host and on its load at the time, so each
script prints this header first; BENCHMARKS.md quotes it beside the figures.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, or the platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    """One line: CPUs, CPU model, Python, kernel, load average right now."""
    one, five, fifteen = os.getloadavg()
    return (
        f"{os.cpu_count()} CPUs ({cpu_model()}), Python "
        f"{sys.version.split()[0]}, {platform.system()} {platform.release()}, "
        f"load average {one:.2f} {five:.2f} {fifteen:.2f}"
    )


def console() -> Console:
    """A console that never wraps a table row off a terminal."""
    return Console(width=None if sys.stdout.isatty() else 200, highlight=False)


def table(title: str, columns: Sequence[str], right: Sequence[str] = ()) -> Table:
    """An empty table; columns named in *right* are right-aligned (numbers)."""
    out = Table(title=title, title_justify="left", header_style="bold")
    for column in columns:
        out.add_column(column, justify="right" if column in right else "left")
    return out


def median(values: Sequence[float]) -> float:
    """The median, or NaN for no values (a row that could not be measured)."""
    return statistics.median(values) if values else float("nan")
