"""Leak reports for people and for machines.

People get aligned tables (via `rich`) with every path in full and the next
command to run; machines get JSON, written atomically so a reader never sees
half a report. The same functions serve ``harness check``, ``harness ps``,
``harness reap`` and the runner's summary after a session.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import msgspec

from harness.atomic_write import write_atomic
from harness.errors import HarnessError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.tree import Tree

    from harness.leaks import LeakedProcess, LeakReport
    from harness.reap import ReapResult

#: Width of the console when output is not a terminal (a CI log, a file):
#: wide enough that paths and command lines stay on one line.
LOG_WIDTH = 160


def make_console(stream: IO[str] | None = None) -> Console:
    """A rich console on *stream* (default stdout), wide when not a terminal."""
    from rich.console import Console

    stream = stream if stream is not None else sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    return Console(
        file=stream,
        width=None if tty else LOG_WIDTH,
        highlight=False,
        soft_wrap=False,
        no_color=not tty,
    )


# ------------------------------------------------------------------ JSON


def to_json(value: Any) -> bytes:
    """*value* (a report, a result, or plain data holding them) as JSON."""
    return msgspec.json.format(msgspec.json.encode(value), indent=2) + b"\n"


def write_report(path: str | os.PathLike[str], value: Any) -> Path:
    """Write *value* as JSON to *path* atomically (temp file, fsync, rename).

    Raises `HarnessError` naming the path when it cannot be written.
    """
    final = Path(path).absolute()
    try:
        write_atomic(final, to_json(value))
    except OSError as exc:
        msg = (
            f"cannot write the leak report to {str(final)!r}: {exc.strerror}; "
            "pass a --report path in a writable folder"
        )
        raise HarnessError(msg) from None
    return final


# ---------------------------------------------------------------- pieces


def format_age(seconds: float) -> str:
    """``0.4s``, ``12s``, ``3m05s``, ``2h07m``, ``3d04h``."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


#: Longest argument shown whole in a command line; the JSON report has all.
MAX_ARG = 80


def short_command(cmdline: Sequence[str], name: str) -> str:
    """A command line on one line: newlines shown as ``\\n``, arguments
    longer than `MAX_ARG` cut with ``...``; ``[name]`` when it is empty."""
    if not cmdline:
        return f"[{name}]"
    shown = []
    for arg in cmdline:
        one_line = arg.replace("\n", "\\n")
        if len(one_line) > MAX_ARG:
            one_line = one_line[: MAX_ARG - 3] + "..."
        shown.append(one_line)
    return " ".join(shown)


def command_of(proc: LeakedProcess) -> str:
    return short_command(proc.cmdline, proc.name)


def _owner_text(report: LeakReport) -> str:
    alive = "running" if report.owner_alive else "gone"
    return f"{report.state}; owner {report.owner_pid} {alive}"


def _table(*headers: str) -> Any:
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold", show_edge=False)
    for header in headers:
        # Paths and commands are folded, never cut: a path must stay whole.
        table.add_column(header, overflow="fold")
    return table


def _process_table(report: LeakReport) -> Any:
    table = _table("PID", "PPID", "USER", "AGE", "STATUS", "FOUND BY", "COMMAND")
    for proc in report.processes:
        table.add_row(
            str(proc.pid),
            str(proc.ppid),
            proc.user,
            format_age(proc.age),
            proc.status,
            ",".join(proc.how),
            command_of(proc),
        )
    return table


def _socket_table(report: LeakReport) -> Any:
    table = _table("STATE", "HELD BY", "SOCKET FILE")
    for sock in report.sockets:
        held = ",".join(map(str, sock.holders)) or "-"
        table.add_row(sock.state, held, sock.path)
    return table


def _listener_table(report: LeakReport) -> Any:
    table = _table("LISTENER", "FAMILY", "UID", "PIDS")
    for listener in report.listeners:
        pids = ",".join(map(str, listener.pids)) or "? (not visible to this user)"
        table.add_row(listener.address, listener.family, str(listener.uid), pids)
    return table


# ----------------------------------------------------------------- check


def render_report(
    report: LeakReport, console: Console, *, next_step: bool = True
) -> None:
    """Print *report*: a headline, then one table per kind of leak."""
    head = f"[bold]Session {report.session}[/bold] ({_owner_text(report)})"
    if not report.leaked and not report.processes:
        console.print(f"{head}: clean, nothing left behind.")
    else:
        console.print(f"{head}: [bold]{_leak_summary(report)}[/bold]")
    console.print(f"  bindspace  {report.bindspace}")
    if report.port is not None:
        console.print(f"  port       {report.port}")
    if report.netns and not report.netns_visible:
        console.print(
            f"  [yellow]network namespace {report.netns} has no process left to "
            "read its socket tables through; socket files were probed by "
            "connecting[/yellow]"
        )
    if report.processes:
        console.print()
        console.print(_process_table(report))
    if report.sockets:
        console.print()
        console.print(_socket_table(report))
    if report.listeners:
        console.print()
        console.print(_listener_table(report))
    if report.skipped:
        console.print()
        console.print(
            f"Not judged: {len(report.skipped)} process(es) linked to the session "
            "that are not this user's or could not be verified:"
        )
        table = _table("PID", "LINK", "REASON")
        for skip in report.skipped:
            table.add_row(str(skip.pid), ",".join(skip.how), skip.reason)
        console.print(table)
    if next_step:
        step = _next_step(report)
        if step:
            console.print()
            console.print(step)


def _leak_summary(report: LeakReport) -> str:
    alive = len(report.processes) - len(report.zombies)
    parts = []
    for count, noun in (
        (alive, "process"),
        (len(report.sockets), "socket file"),
        (len(report.listeners), "port listener"),
        (len(report.zombies), "zombie"),
    ):
        if count:
            parts.append(f"{count} {noun}{'es' if noun == 'process' else 's'}")
            if count == 1:
                parts[-1] = f"1 {noun}"
    return "left " + ", ".join(parts)


def _next_step(report: LeakReport) -> str:
    if report.leaked:
        return (
            f"Next: [bold]harness reap {report.session}[/bold]   ends the "
            "processes, removes stale socket files (--dry-run previews)\n"
            f"      [bold]harness ps {report.session}[/bold]     shows the "
            "process tree"
        )
    if not report.owner_alive:
        return (
            f"Next: [bold]harness reap {report.session}[/bold] removes its "
            "bindspace and record."
        )
    return ""


def render_reports(reports: Sequence[LeakReport], console: Console) -> None:
    """Print several reports, separated by a blank line."""
    for index, report in enumerate(reports):
        if index:
            console.print()
        render_report(report, console)


# ------------------------------------------------------------------ reap


def render_reap(result: ReapResult, console: Console) -> None:
    """Print what a reap did (or, dry, would do), and what is left."""
    before = result.before
    if result.dry_run:
        console.print(
            f"[bold]Session {result.session}[/bold] ({_owner_text(before)}): "
            "dry run, nothing was changed. Would:"
        )
        if not result.plan:
            console.print("  nothing: the session left nothing behind.")
        for step in result.plan:
            console.print(f"  - {step}")
        return

    console.print(f"[bold]Session {result.session}[/bold] ({_owner_text(before)})")
    if result.processes:
        table = _table("PID", "OUTCOME", "SIGNAL", "FOUND BY", "COMMAND", "NOTE")
        for proc in result.processes:
            command = short_command(proc.cmdline, proc.name)
            table.add_row(
                str(proc.pid),
                proc.outcome,
                proc.signal or "-",
                ",".join(proc.how),
                command,
                proc.note,
            )
        console.print(table)
    else:
        console.print("  no processes to reap")
    for path in result.removed_sockets:
        console.print(f"  removed stale socket file {path}")
    for path in result.kept_sockets:
        console.print(f"  kept socket file {path} (something still listens on it)")
    if result.removed_bindspace:
        console.print(f"  removed bindspace {before.bindspace}")
    if result.removed_record:
        console.print("  removed the session record")
    if result.clean:
        console.print("  clean: nothing is left.")
    else:
        console.print(
            f"  [bold red]still left: {_leak_summary(result.after)}[/bold red]; "
            f"`harness check {result.session}` shows what, "
            f"`harness reap {result.session} --grace 10` tries again with more "
            "time."
        )


# ------------------------------------------------------------------ tree


def process_tree(report: LeakReport) -> Tree:
    """The session's processes as a tree under its owner (if running)."""
    from rich.tree import Tree

    root = Tree(
        f"[bold]Session {report.session}[/bold] ({_owner_text(report)}) "
        f"{report.bindspace}"
    )
    by_pid = {p.pid: p for p in report.processes}
    nodes: dict[int, Tree] = {}
    owner = (
        root.add(f"{report.owner_pid} [dim]owner[/dim]") if report.owner_alive else None
    )

    def label(proc: LeakedProcess) -> str:
        extra = f"  holds {', '.join(proc.holds)}" if proc.holds else ""
        return (
            f"{proc.pid} {command_of(proc)}  [dim]{','.join(proc.how)} · "
            f"ppid {proc.ppid} · "
            f"{proc.status} · {format_age(proc.age)}{extra}[/dim]"
        )

    def node_for(pid: int, seen: frozenset[int] = frozenset()) -> Tree:
        if pid in nodes:
            return nodes[pid]
        proc = by_pid[pid]
        if proc.ppid in by_pid and proc.ppid not in seen:
            parent = node_for(proc.ppid, seen | {pid})
        elif owner is not None and proc.ppid == report.owner_pid:
            parent = owner
        else:
            parent = root
        nodes[pid] = parent.add(label(proc))
        return nodes[pid]

    for pid in sorted(by_pid):
        node_for(pid)
    if not by_pid:
        root.add("[dim]no processes[/dim]")
    return root
