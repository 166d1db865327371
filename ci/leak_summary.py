"""The rows of a leak report: what leaked, where, and how it was found.

A leak report is the JSON encoding of `harness.leaks.LeakReport`: the
session's id, its bindspace and port, and three lists, ``sockets`` (socket
files left in the bindspace), ``processes`` (processes of the session still
alive) and ``listeners`` (listeners on the session's TCP port). This module
reads that JSON as plain data, so a summary can be written on a machine where
the harness that wrote the report is a different version, and turns each
entry into one `LeakRow`. A file that is not a leak report is recognised as
such (`is_leak_report`) and left to other readers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

log = logging.getLogger("harness.ci.leak_summary")

#: The keys that make a JSON object a leak report.
LEAK_KEYS: Final = ("sockets", "processes", "listeners")

#: Longest command line shown in a row; the full one is in the report.
COMMAND_LIMIT: Final = 90


@dataclass(frozen=True)
class LeakRow:
    """One leaked thing, ready for a table."""

    kind: str
    """``socket``, ``process`` or ``listener``."""
    what: str
    where: str
    found_by: str


@dataclass(frozen=True)
class LeakFile:
    """One leak report file and its rows."""

    path: Path
    session: str = ""
    bindspace: str = ""
    port: int | None = None
    rows: tuple[LeakRow, ...] = field(default=())
    problem: str | None = None
    """Why the file could not be read; no rows when set."""

    def count(self, kind: str) -> int:
        """How many rows of *kind* (``socket``, ``process``, ``listener``)."""
        return sum(1 for row in self.rows if row.kind == kind)


def is_leak_report(data: Any) -> bool:
    """Whether decoded JSON *data* has the shape of a leak report."""
    return isinstance(data, dict) and any(
        isinstance(data.get(key), list) for key in LEAK_KEYS
    )


def _shorten(text: str, limit: int = COMMAND_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _pids(value: Any) -> str:
    pids = [str(p) for p in value or ()]
    return ("pid " if len(pids) == 1 else "pids ") + ", ".join(pids) if pids else ""


def socket_row(entry: dict[str, Any]) -> LeakRow:
    """A row for one entry of ``sockets``."""
    state = entry.get("state") or "unknown"
    holders = _pids(entry.get("holders"))
    found = "socket file in the bindspace"
    return LeakRow(
        kind="socket",
        what=f"socket file ({state})",
        where=str(entry.get("path", "?")),
        found_by=f"{found}, held by {holders}" if holders else found,
    )


def process_row(entry: dict[str, Any]) -> LeakRow:
    """A row for one entry of ``processes``."""
    name = entry.get("name") or "?"
    status = entry.get("status")
    what = f"pid {entry.get('pid', '?')} {name}"
    if status == "zombie":
        what += " (zombie)"
    command = " ".join(str(part) for part in entry.get("cmdline") or ())
    how = ", ".join(str(h) for h in entry.get("how") or ()) or "?"
    holds = ", ".join(str(h) for h in entry.get("holds") or ())
    return LeakRow(
        kind="process",
        what=what,
        where=_shorten(command) or f"parent pid {entry.get('ppid', '?')}",
        found_by=f"{how}; holds {holds}" if holds else how,
    )


def listener_row(entry: dict[str, Any]) -> LeakRow:
    """A row for one entry of ``listeners``."""
    host = str(entry.get("host", "?"))
    host = f"[{host}]" if ":" in host else host
    return LeakRow(
        kind="listener",
        what=f"tcp {host}:{entry.get('port', '?')}",
        where=_pids(entry.get("pids")) or "owner not visible",
        found_by="listening on the session's port",
    )


def leak_rows(data: dict[str, Any]) -> list[LeakRow]:
    """Every leaked thing in the decoded leak report *data*, sockets first."""
    rows: list[LeakRow] = []
    for entry in data.get("sockets") or ():
        rows.append(socket_row(entry if isinstance(entry, dict) else {"path": entry}))
    for entry in data.get("processes") or ():
        rows.append(process_row(entry if isinstance(entry, dict) else {"pid": entry}))
    for entry in data.get("listeners") or ():
        rows.append(listener_row(entry if isinstance(entry, dict) else {}))
    return rows


def read_leak_file(path: Path) -> LeakFile | None:
    """Read the leak report at *path*; ``None`` if it is another kind of JSON.

    A file that cannot be read or is not JSON at all comes back with
    ``problem`` set, because a truncated report still means the check ran.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        return LeakFile(path=path, problem=f"cannot be read: {exc.strerror}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return LeakFile(path=path, problem=f"is not valid JSON ({exc})")
    if not is_leak_report(data):
        return None
    port = data.get("port")
    return LeakFile(
        path=path,
        session=str(data.get("session") or ""),
        bindspace=str(data.get("bindspace") or ""),
        port=port if isinstance(port, int) else None,
        rows=tuple(leak_rows(data)),
    )
