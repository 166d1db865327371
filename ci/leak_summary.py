"""The rows of a leak report: what leaked, where, and how it was found.

A leak report is the JSON encoding of `harness.leaks.LeakReport`: the
session's id, its bindspace and port, and three lists, ``sockets`` (socket
files left in the bindspace), ``processes`` (processes of the session still
alive) and ``listeners`` (listeners on the session's TCP port).
``harness exec --report`` writes one such object; ``harness check --report``
writes ``{"leaked": ..., "sessions": [...]}`` with one per session checked.
Both are read here as plain data, so a summary can be written on a machine
where the harness that wrote the report is a different version, and each
entry becomes one `LeakRow`. A file that is not a leak report is recognised
as such (`is_leak_report`) and left to other readers.
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
class SessionLeaks:
    """What one session left behind, from one leak report."""

    session: str = ""
    bindspace: str = ""
    port: int | None = None
    rows: tuple[LeakRow, ...] = ()


@dataclass(frozen=True)
class LeakFile:
    """One leak report file: one or more sessions' leaks."""

    path: Path
    sessions: tuple[SessionLeaks, ...] = field(default=())
    problem: str | None = None
    """Why the file could not be read; no sessions when set."""

    @property
    def rows(self) -> tuple[LeakRow, ...]:
        """Every leaked thing in the file, session after session."""
        return tuple(row for leaks in self.sessions for row in leaks.rows)

    def count(self, kind: str) -> int:
        """How many rows of *kind* (``socket``, ``process``, ``listener``)."""
        return sum(1 for row in self.rows if row.kind == kind)


def _is_one_report(data: Any) -> bool:
    return isinstance(data, dict) and any(
        isinstance(data.get(key), list) for key in LEAK_KEYS
    )


def session_reports(data: Any) -> list[dict[str, Any]] | None:
    """The per-session reports in decoded JSON *data*; None if it is no leak
    report (neither one report nor ``{"sessions": [report, ...]}``)."""
    if _is_one_report(data):
        return [data]
    if isinstance(data, dict) and isinstance(data.get("sessions"), list):
        reports = data["sessions"]
        if all(_is_one_report(r) for r in reports):
            return list(reports)
    return None


def is_leak_report(data: Any) -> bool:
    """Whether decoded JSON *data* has the shape of a leak report."""
    return session_reports(data) is not None


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
    reports = session_reports(data)
    if reports is None:
        return None
    sessions = []
    for report in reports:
        port = report.get("port")
        sessions.append(
            SessionLeaks(
                session=str(report.get("session") or ""),
                bindspace=str(report.get("bindspace") or ""),
                port=port if isinstance(port, int) else None,
                rows=tuple(leak_rows(report)),
            )
        )
    return LeakFile(path=path, sessions=tuple(sessions))
