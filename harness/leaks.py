"""The leak check: what a session left behind, found from its record alone.

`check_leaks` inspects, without changing anything:

- socket files left anywhere under the session's bindspace, each ``live``
  (a listener still answers on it) or ``stale`` (its listener is dead, as
  after a SIGKILL);
- processes of the session that are still alive (see `harness.attribution`
  for how a process is found to belong to a session);
- listeners still bound to the session's TCP port.

It works on a live, stale or leaked session from any process of the same
user, since everything it needs is in the `SessionRecord`. The result, a
`LeakReport`, is a msgspec ``Struct`` and encodes to JSON as is.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pwd
import socket
import stat
import time
from collections.abc import Iterable
from typing import Literal

import msgspec
import psutil

from harness.attribution import (
    ProcessTable,
    attribute,
    ordered_how,
    same_create_time,
    scan_processes,
)
from harness.procfs import (
    TcpListener,
    UnixSocket,
    holders_of,
    net_dir,
    net_namespace_of,
    read_tcp_listeners,
    read_unix_sockets,
)
from harness.records import SessionRecord, owner_alive, record_state

log = logging.getLogger("harness.leaks")

SocketState = Literal["live", "stale", "unknown"]


class SocketFile(msgspec.Struct, kw_only=True):
    """A socket file left in the bindspace."""

    path: str
    state: SocketState
    """``live``: something listens on it; ``stale``: nothing does any more;
    ``unknown``: it could not be told (no permission to connect)."""
    holders: list[int] = msgspec.field(default_factory=list)
    """Pids found holding the socket open."""


class LeakedProcess(msgspec.Struct, kw_only=True):
    """A process of the session that is still there."""

    pid: int
    ppid: int
    create_time: float
    """With *pid*, the identity that `harness.reap` checks before a signal."""
    age: float
    """Seconds since the process started, at the time of the check."""
    uid: int
    user: str
    name: str
    cmdline: list[str]
    status: str
    """psutil's status: ``sleeping``, ``running``, ``zombie``, ..."""
    how: list[str]
    """How it was attributed: ``descendant``, ``envelope``, ``socket``,
    ``port``."""
    holds: list[str] = msgspec.field(default_factory=list)
    """The session's sockets it holds: socket paths and ``tcp host:port``."""

    @property
    def zombie(self) -> bool:
        return bool(self.status == psutil.STATUS_ZOMBIE)


class PortListener(msgspec.Struct, kw_only=True):
    """A TCP socket listening on the session's port."""

    family: str
    host: str
    port: int
    uid: int
    pids: list[int] = msgspec.field(default_factory=list)
    """Processes holding it, when they could be seen."""

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class SkippedProcess(msgspec.Struct, kw_only=True):
    """A process linked to the session that was neither counted nor touched."""

    pid: int
    reason: str
    how: list[str]


class LeakReport(msgspec.Struct, kw_only=True):
    """Everything a session left behind, at one moment."""

    session: str
    state: str
    """The record's state at the check: ``live``, ``stale`` or ``leaked``."""
    owner_pid: int
    owner_alive: bool
    bindspace: str
    port: int | None
    checked_at: float
    duration: float
    """Seconds the check took."""
    processes: list[LeakedProcess] = msgspec.field(default_factory=list)
    sockets: list[SocketFile] = msgspec.field(default_factory=list)
    listeners: list[PortListener] = msgspec.field(default_factory=list)
    skipped: list[SkippedProcess] = msgspec.field(default_factory=list)
    other_users: int = 0
    """Processes of other users on the host, whose environment was not read."""
    scanned: int = 0
    """Processes looked at."""
    netns: str | None = None
    """The session's private network namespace, if it had one."""
    netns_visible: bool = True
    """Whether that namespace's socket tables could be read (through one of
    its processes); when not, live sockets are told by connecting."""

    leak_count: int = 0
    """Live processes, socket files and port listeners left, together.
    Zombies are listed but not counted: they hold nothing but a pid, and
    their parent (or the session's subreaper) collects them."""

    def __post_init__(self) -> None:
        alive = [p for p in self.processes if not p.zombie]
        self.leak_count = len(alive) + len(self.sockets) + len(self.listeners)

    @property
    def leaked(self) -> bool:
        return self.leak_count > 0

    @property
    def zombies(self) -> list[LeakedProcess]:
        return [p for p in self.processes if p.zombie]

    @property
    def stale_sockets(self) -> list[SocketFile]:
        return [s for s in self.sockets if s.state == "stale"]


# ------------------------------------------------------------------ sockets


def socket_files(bindspace: str | os.PathLike[str]) -> list[str]:
    """Every socket file under *bindspace*, sorted; symlinks are not followed.

    A missing bindspace has none. Only sockets are listed: other files in the
    bindspace are not leaks of a listener.
    """
    found: list[str] = []
    root = os.fspath(bindspace)
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in files + dirs:
            path = os.path.join(folder, name)
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    found.append(path)
            except OSError:
                continue  # removed while we walked
    return sorted(found)


def probe_socket(path: str) -> SocketState | None:
    """Tell by connecting whether anything listens on the socket *path*.

    Returns ``None`` when the file is gone. A connection that is accepted, or
    refused only because the socket is of another type, means a listener is
    bound there; ``ECONNREFUSED`` means nobody is.
    """
    for kind in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET):
        sock = socket.socket(socket.AF_UNIX, kind)
        sock.setblocking(False)
        try:
            sock.connect(path)
        except BlockingIOError:
            return "live"  # queued in a full backlog: someone listens
        except FileNotFoundError:
            return None
        except ConnectionRefusedError:
            return "stale"
        except PermissionError:
            return "unknown"
        except OSError as exc:
            if exc.errno == errno.EPROTOTYPE:
                continue  # a listener of another type; try the next type
            return "unknown"
        else:
            return "live"
        finally:
            sock.close()
    return "live"  # bound as a datagram socket


# -------------------------------------------------------- network namespaces


def _net_dirs(record: SessionRecord, table: ProcessTable) -> tuple[list[str], bool]:
    """The ``/proc/.../net`` folders to read, and whether the session's
    private network namespace (if any) is among them."""
    dirs = [net_dir()]
    if not record.netns or record.netns == net_namespace_of():
        return dirs, True
    # Another namespace's tables are readable through any process inside it;
    # the owner's children are the likeliest, so they are tried first.
    me = os.getuid()
    first = table.children.get(record.owner_pid, [])
    rest = (pid for pid, info in table.procs.items() if info.uid == me)
    for pid in (*first, *rest):
        if net_namespace_of(pid) == record.netns:
            dirs.append(net_dir(pid))
            return dirs, True
    return dirs, False


# -------------------------------------------------------------------- check


def check_leaks(
    record: SessionRecord, *, exclude_pids: Iterable[int] = ()
) -> LeakReport:
    """Inspect what *record*'s session left behind; change nothing.

    *exclude_pids* are never reported (the runner passes its own helpers);
    the owner, this process and its ancestors never are either. Processes of
    other users and processes whose link to the session cannot be verified
    are listed in ``skipped`` with the reason. Never raises for a process
    that exits during the check.
    """
    started = time.monotonic()
    log.debug("Checking session %s for leaks.", record.id)
    table = scan_processes()
    dirs, netns_visible = _net_dirs(record, table)

    # One read of each socket table: the bindspace's Unix sockets (a deleted
    # file's listener still counts) and the listeners on the session's port.
    prefix = record.bindspace.rstrip("/") + "/"
    unix: dict[str, list[UnixSocket]] = {}
    tcp: dict[int, TcpListener] = {}
    for folder in dirs:
        for path, socks in read_unix_sockets(folder).items():
            if path.startswith(prefix):
                unix.setdefault(path, []).extend(socks)
        if record.port is not None:
            for listener in read_tcp_listeners(record.port, folder):
                tcp[listener.inode] = listener

    # Which of our own processes hold those sockets.
    me = os.getuid()
    inode_paths = {s.inode: path for path, socks in unix.items() for s in socks}
    own = [p for p, info in table.procs.items() if info.uid == me and not info.zombie]
    holders = holders_of([*inode_paths, *tcp], own)
    ways: dict[int, set[str]] = {}
    holds: dict[int, set[str]] = {}
    for inode, pids in holders.items():
        for pid in pids:
            if inode in tcp:
                ways.setdefault(pid, set()).add("port")
                listener = tcp[inode]
                holds.setdefault(pid, set()).add(f"tcp {_address(listener)}")
            else:
                ways.setdefault(pid, set()).add("socket")
                holds.setdefault(pid, set()).add(inode_paths[inode])

    attribution = attribute(record, table, holders=ways, exclude_pids=exclude_pids)

    processes = []
    now = time.time()
    for pid, how in sorted(attribution.found.items()):
        info = table.procs[pid]
        detail = _details(pid, info.create_time)
        if detail is None:
            continue  # exited, or its pid was recycled, since the scan
        cmdline, status = detail
        processes.append(
            LeakedProcess(
                pid=pid,
                ppid=info.ppid,
                create_time=info.create_time,
                age=max(0.0, now - info.create_time),
                uid=info.uid if info.uid is not None else -1,
                user=_user(info.uid),
                name=info.name,
                cmdline=cmdline,
                status=status,
                how=ordered_how(how),
                holds=sorted(holds.get(pid, ())),
            )
        )

    sockets = []
    for path in socket_files(record.bindspace):
        socks = unix.get(path, [])
        if any(s.listening for s in socks):
            state: SocketState | None = "live"
        else:
            state = probe_socket(path)
        if state is None:
            continue
        pids = sorted({p for s in socks for p in holders.get(s.inode, ())})
        sockets.append(SocketFile(path=path, state=state, holders=pids))

    listeners = []
    for inode, listener in sorted(tcp.items()):
        pids = sorted(holders.get(inode, ()))
        if pids and set(pids) <= attribution.excluded:
            continue  # the owner's or the runner's own, not a leak
        listeners.append(
            PortListener(
                family=listener.family,
                host=listener.host,
                port=listener.port,
                uid=listener.uid,
                pids=pids,
            )
        )

    report = LeakReport(
        session=record.id,
        state=record_state(record),
        owner_pid=record.owner_pid,
        owner_alive=attribution.owner_alive,
        bindspace=record.bindspace,
        port=record.port,
        checked_at=now,
        duration=time.monotonic() - started,
        processes=processes,
        sockets=sockets,
        listeners=listeners,
        skipped=[
            SkippedProcess(pid=s.pid, reason=s.reason, how=ordered_how(s.how))
            for s in attribution.skipped
        ],
        other_users=attribution.other_users,
        scanned=len(table.procs),
        netns=record.netns,
        netns_visible=netns_visible,
    )
    log.debug(
        "Session %s: %d processes, %d socket files, %d listeners left (%.3f s).",
        record.id,
        len(processes),
        len(sockets),
        len(listeners),
        report.duration,
    )
    return report


def _address(listener: TcpListener) -> str:
    host = f"[{listener.host}]" if ":" in listener.host else listener.host
    return f"{host}:{listener.port}"


def _details(pid: int, create_time: float) -> tuple[list[str], str] | None:
    """Command line and status of *pid*, if it is still the same process."""
    try:
        proc = psutil.Process(pid)
        if not same_create_time(proc.create_time(), create_time):
            return None
        status = proc.status()
        cmdline: list[str] = []
        with contextlib.suppress(psutil.AccessDenied, psutil.ZombieProcess):
            cmdline = proc.cmdline()
        return cmdline, status
    except psutil.NoSuchProcess:
        return None


_users: dict[int | None, str] = {}


def _user(uid: int | None) -> str:
    if uid not in _users:
        try:
            _users[uid] = pwd.getpwuid(uid).pw_name if uid is not None else "?"
        except KeyError:
            _users[uid] = str(uid)
    return _users[uid]


def session_processes(
    record: SessionRecord, *, include_owner: bool = True
) -> list[tuple[psutil.Process, str]]:
    """The live processes of *record*'s session, each with how it was found.

    The owner comes first while it runs (unless *include_owner* is false, or
    the caller is the owner); then every process the leak check attributes
    to the session, re-verified by creation time so a recycled pid is never
    returned. This is what stack capture (`harness dump`, the hang report)
    looks at.
    """
    targets: list[tuple[psutil.Process, str]] = []
    if include_owner and owner_alive(record) and record.owner_pid != os.getpid():
        with contextlib.suppress(psutil.NoSuchProcess):
            targets.append((psutil.Process(record.owner_pid), "owner"))
    for leaked in check_leaks(record).processes:
        if leaked.zombie:
            continue
        try:
            proc = psutil.Process(leaked.pid)
            if abs(proc.create_time() - leaked.create_time) > 0.01:
                continue
        except psutil.NoSuchProcess:
            continue
        targets.append((proc, ", ".join(leaked.how)))
    return targets
