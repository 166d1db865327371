"""Finding the processes that belong to a session.

A process belongs to a session when at least one of these holds, and each
one that holds is kept as the *how* of the attribution:

- ``descendant``: it descends from the session's owner (while the owner
  runs) or from another process of the session;
- ``envelope``: its environment carries this session's envelope, so an
  orphan re-parented to init or to another subreaper still counts;
- ``socket``: it holds a socket bound in the session's bindspace, which
  catches a child started with ``env -i``;
- ``port``: it listens on the session's TCP port.

Identity is ``(pid, create_time)``, never the pid alone, so a pid the kernel
has recycled since is not mistaken for the session's process. Processes of
other users are never inspected beyond what ``psutil`` shows everyone; a
process whose link to the session cannot be verified is *skipped* with the
reason, never guessed into the session.

All of it comes from one pass over the process table (`scan_processes`).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

import psutil

from harness.errors import RtVarsError
from harness.records import SessionRecord
from harness.rtvars import RuntimeVars, decode_rtvars

log = logging.getLogger("harness.attribution")

How = Literal["descendant", "envelope", "socket", "port"]

#: The order in which the ways of attribution are listed.
HOW_ORDER: Final[tuple[How, ...]] = ("descendant", "envelope", "socket", "port")

#: Two readings of one process's creation time differ by far less than this;
#: the kernel cannot recycle a pid that fast.
CREATE_TIME_TOLERANCE: Final = 0.01

_SCAN_ATTRS: Final = ["pid", "ppid", "uids", "create_time", "status", "name"]


@dataclass(slots=True)
class ProcInfo:
    """What one pass over the process table knows about a process."""

    pid: int
    ppid: int
    uid: int | None
    """Real uid; ``None`` when even that could not be read."""
    create_time: float
    status: str
    name: str

    @property
    def zombie(self) -> bool:
        return bool(self.status == psutil.STATUS_ZOMBIE)


@dataclass(slots=True)
class ProcessTable:
    """A snapshot of the process table: every process, and who is whose child."""

    procs: dict[int, ProcInfo]
    children: dict[int, list[int]]

    def ancestors(self, pid: int) -> list[int]:
        """The parents of *pid*, nearest first, as far as the snapshot knows."""
        chain: list[int] = []
        seen = {pid}
        info = self.procs.get(pid)
        while info is not None and info.ppid not in seen and info.ppid > 0:
            chain.append(info.ppid)
            seen.add(info.ppid)
            info = self.procs.get(info.ppid)
        return chain

    def same_process(self, pid: int, create_time: float) -> bool:
        """Whether *pid* in the snapshot is the process created at *create_time*."""
        info = self.procs.get(pid)
        return info is not None and same_create_time(info.create_time, create_time)


def same_create_time(a: float, b: float) -> bool:
    return abs(a - b) < CREATE_TIME_TOLERANCE


def scan_processes() -> ProcessTable:
    """Take one snapshot of every process the system shows this user.

    One ``psutil.process_iter`` pass reads pid, parent, uid, creation time,
    status and name; processes that exit during the pass are left out.
    """
    procs: dict[int, ProcInfo] = {}
    for proc in psutil.process_iter(_SCAN_ATTRS, ad_value=None):
        info = proc.info
        if info["create_time"] is None or info["ppid"] is None:
            continue  # vanished mid-read, or not even its stat is readable
        uids = info["uids"]
        procs[info["pid"]] = ProcInfo(
            pid=info["pid"],
            ppid=info["ppid"],
            uid=uids.real if uids is not None else None,
            create_time=info["create_time"],
            status=info["status"] or "?",
            name=info["name"] or "?",
        )
    children: dict[int, list[int]] = {}
    for entry in procs.values():
        if entry.ppid != entry.pid:
            children.setdefault(entry.ppid, []).append(entry.pid)
    return ProcessTable(procs, children)


class EnvironUnreadable(Exception):
    """The environment of a process cannot be read; the message says why."""


def read_environ(pid: int) -> bytes:
    """The raw ``NAME=value\\0...`` environment process *pid* started with.

    Raises `EnvironUnreadable` when it is gone or not ours to read.
    """
    if sys.platform.startswith("linux"):
        try:
            with open(f"/proc/{pid}/environ", "rb") as file:
                return file.read()
        except FileNotFoundError:
            raise EnvironUnreadable("exited during the check") from None
        except ProcessLookupError:
            raise EnvironUnreadable("exited during the check") from None
        except PermissionError:
            raise EnvironUnreadable("environment not readable (permission)") from None
        except OSError as exc:
            raise EnvironUnreadable(f"environment not readable ({exc})") from None
    # Elsewhere psutil knows the platform's way.
    try:
        env = psutil.Process(pid).environ()
    except psutil.NoSuchProcess:
        raise EnvironUnreadable("exited during the check") from None
    except psutil.AccessDenied:
        raise EnvironUnreadable("environment not readable (permission)") from None
    return b"\0".join(f"{k}={v}".encode() for k, v in env.items())


def envelope_in(raw: bytes, name: str) -> RuntimeVars | None:
    """Decode the envelope *name* from a raw environment, or ``None``.

    Raises `RtVarsError` when the variable is there but malformed.
    """
    prefix = name.encode() + b"="
    for entry in raw.split(b"\0"):
        if entry.startswith(prefix):
            text = entry[len(prefix) :].decode("utf-8", "surrogateescape")
            return decode_rtvars(text, name=name)
    return None


@dataclass(slots=True)
class Skipped:
    """A process linked to the session that the check would not judge."""

    pid: int
    reason: str
    how: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Attribution:
    """The session's processes, each with how it was found."""

    found: dict[int, set[str]]
    skipped: list[Skipped]
    owner_alive: bool
    other_users: int
    """Processes of other users, whose environment was not read."""
    excluded: set[int]


def _session_of(pid: int, name: str) -> str | None:
    """The session id in *pid*'s envelope; ``None`` without an envelope."""
    try:
        rtvars = envelope_in(read_environ(pid), name)
    except (EnvironUnreadable, RtVarsError):
        return None
    return None if rtvars is None else rtvars.session


def attribute(
    record: SessionRecord,
    table: ProcessTable,
    *,
    holders: Mapping[int, Collection[str]] | None = None,
    exclude_pids: Iterable[int] = (),
) -> Attribution:
    """Find the processes of *record*'s session in *table*.

    *holders* maps a pid to the ways it holds the session's sockets
    (``socket``, ``port``), as found in ``/proc``. *exclude_pids* are never
    reported (the runner's own helpers); neither are the owner, this process
    and its ancestors, so a check run from a shell inside the session never
    reaps that shell.
    """
    me = os.getuid()
    holders = holders or {}
    found: dict[int, set[str]] = {}
    skipped: dict[int, Skipped] = {}

    # Who must never be reported: the owner, ourselves and whoever started us.
    owner_alive = table.same_process(record.owner_pid, record.owner_create_time)
    excluded = set(exclude_pids) | {os.getpid(), *table.ancestors(os.getpid())}
    if owner_alive:
        excluded.add(record.owner_pid)
    excluded.discard(0)

    def skip(pid: int, reason: str, how: str) -> None:
        entry = skipped.setdefault(pid, Skipped(pid, reason))
        if how not in entry.how:
            entry.how.append(how)

    # (b) the envelope: one read of each own process's raw environment, and
    # a full decode only when the session id appears in it.
    needle = record.id.encode()
    other_users = 0
    for info in table.procs.values():
        if info.pid in excluded:
            continue
        if info.uid != me:
            other_users += 1
            continue
        if info.zombie:
            continue  # a zombie's environment is gone with its memory
        try:
            raw = read_environ(info.pid)
        except EnvironUnreadable as exc:
            log.debug("Process %s: %s.", info.pid, exc)
            continue
        if needle not in raw:
            continue
        try:
            rtvars = envelope_in(raw, record.envelope_name)
        except RtVarsError as exc:
            skip(info.pid, f"malformed envelope: {exc}", "envelope")
            continue
        if rtvars is not None and rtvars.session == record.id:
            found.setdefault(info.pid, set()).add("envelope")

    # (c) sockets and the port, as found in /proc by the caller. A process
    # that carries *another* session's envelope is that session's, whatever
    # it holds: a port can be leased again once a session has ended.
    for pid, ways in holders.items():
        holder = table.procs.get(pid)
        if holder is None or pid in excluded:
            continue
        if holder.uid != me:
            for how in ways:
                skip(pid, f"belongs to uid {holder.uid}", how)
            continue
        other = _session_of(pid, record.envelope_name)
        if other and other != record.id:
            for how in ways:
                skip(pid, f"carries the envelope of session {other!r}", how)
            continue
        # A process older than the session's owner cannot be one of the
        # session's processes, whatever it holds: a program outside the
        # harness that bound the leased port after the lease's probe is a
        # collision to report, not a leak to reap. Both start times come from
        # the same clock (boot time plus ticks), unlike the record's wall-clock
        # ``started_at``.
        if holder.create_time < record.owner_create_time - CREATE_TIME_TOLERANCE:
            for how in ways:
                skip(pid, "started before the session's owner", how)
            continue
        found.setdefault(pid, set()).update(ways)

    # (a) descendants of the owner and of every process found so far.
    seeds = list(found)
    if owner_alive:
        seeds.append(record.owner_pid)
    stack = seeds
    visited = set(seeds)
    while stack:
        parent = stack.pop()
        for child in table.children.get(parent, ()):
            if child in excluded:
                continue
            info = table.procs[child]
            if info.uid != me:
                skip(child, f"belongs to uid {info.uid}", "descendant")
                continue
            # A process already found another way is marked too, but its
            # children are walked only once.
            found.setdefault(child, set()).add("descendant")
            if child not in visited:
                visited.add(child)
                stack.append(child)

    for pid in found:
        skipped.pop(pid, None)
    return Attribution(
        found=found,
        skipped=sorted(skipped.values(), key=lambda s: s.pid),
        owner_alive=owner_alive,
        other_users=other_users,
        excluded=excluded,
    )


def ordered_how(ways: Iterable[str]) -> list[str]:
    """*ways* in the fixed order of `HOW_ORDER`."""
    present = set(ways)
    return [how for how in HOW_ORDER if how in present]
