"""Reading Linux's socket tables and file descriptors from ``/proc``.

The leak check needs three facts the kernel keeps in ``/proc``: which Unix
socket paths have a listener (``/proc/net/unix``), which TCP ports are in
``LISTEN`` state (``/proc/net/tcp`` and ``tcp6``), and which process holds a
given socket (``/proc/<pid>/fd/*`` links read ``socket:[<inode>]``).

The tables are per network namespace: ``/proc/net`` is the reader's own,
``/proc/<pid>/net`` is the namespace of process *pid*. Every function here
returns empty results where ``/proc`` does not exist (macOS), so callers
degrade to what they can see without guessing.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

log = logging.getLogger("harness.procfs")

#: ``__SO_ACCEPTCON`` in the ``Flags`` column of ``/proc/net/unix``: the
#: socket has called ``listen()``.
_SO_ACCEPTCON: Final = 0x10000

#: ``TCP_LISTEN`` in the ``st`` column of ``/proc/net/tcp``.
_TCP_LISTEN: Final = 0x0A


@dataclass(frozen=True, slots=True)
class UnixSocket:
    """One line of ``/proc/net/unix`` that has a path."""

    inode: int
    path: str
    listening: bool


@dataclass(frozen=True, slots=True)
class TcpListener:
    """One socket in ``LISTEN`` state from ``/proc/net/tcp`` or ``tcp6``."""

    inode: int
    host: str
    port: int
    family: str
    """``tcp`` or ``tcp6``."""
    uid: int


def net_dir(pid: int | None = None) -> str:
    """``/proc/net`` (this namespace) or ``/proc/<pid>/net`` (that process's)."""
    return "/proc/net" if pid is None else f"/proc/{pid}/net"


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as file:
            return file.read().splitlines()[1:]
    except OSError as exc:
        log.debug("Cannot read %s: %s.", path, exc)
        return []


def read_unix_sockets(net: str = "/proc/net") -> dict[str, list[UnixSocket]]:
    """Unix sockets bound to a file system path, grouped by that path.

    Abstract sockets (``@name``) and unbound ones are left out: they leave no
    file behind. A listener and the connections it accepted share a path, so
    one path can map to several sockets.
    """
    found: dict[str, list[UnixSocket]] = {}
    for line in _read_lines(f"{net}/unix"):
        # Num RefCount Protocol Flags Type St Inode Path; the path may hold
        # spaces, so it is whatever follows the seventh field.
        fields = line.split(None, 7)
        if len(fields) < 8 or not fields[7].startswith("/"):
            continue
        try:
            flags = int(fields[3], 16)
            inode = int(fields[6])
        except ValueError:
            continue
        path = fields[7]
        sock = UnixSocket(inode, path, bool(flags & _SO_ACCEPTCON))
        found.setdefault(path, []).append(sock)
    return found


def _decode_host(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    # The kernel prints each 32-bit word in host byte order (little endian on
    # every platform this runs on), so each word is reversed on its own.
    swapped = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(swapped))


def read_tcp_listeners(
    port: int | None = None, net: str = "/proc/net"
) -> list[TcpListener]:
    """TCP sockets in ``LISTEN`` state, optionally only those on *port*."""
    listeners = []
    for family in ("tcp", "tcp6"):
        for line in _read_lines(f"{net}/{family}"):
            fields = line.split()
            if len(fields) < 10:
                continue
            try:
                if int(fields[3], 16) != _TCP_LISTEN:
                    continue
                hex_host, hex_port = fields[1].split(":")
                local_port = int(hex_port, 16)
                if port is not None and local_port != port:
                    continue
                listeners.append(
                    TcpListener(
                        inode=int(fields[9]),
                        host=_decode_host(hex_host),
                        port=local_port,
                        family=family,
                        uid=int(fields[7]),
                    )
                )
            except ValueError:
                continue
    return listeners


def socket_inodes_of(pid: int) -> set[int]:
    """Inodes of the sockets process *pid* holds open; empty if unreadable."""
    inodes: set[int] = set()
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue  # closed since the listing
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def holders_of(inodes: Iterable[int], pids: Iterable[int]) -> dict[int, list[int]]:
    """Map each socket inode in *inodes* to the *pids* that hold it open.

    Only the processes in *pids* are looked at (the caller passes its own
    user's), so the cost is one listing per process plus one ``readlink``
    per open descriptor. Returns nothing when *inodes* is empty.
    """
    wanted = set(inodes)
    holders: dict[int, list[int]] = {}
    if not wanted:
        return holders
    for pid in pids:
        for inode in socket_inodes_of(pid) & wanted:
            holders.setdefault(inode, []).append(pid)
    return holders


def net_namespace_of(pid: int | None = None) -> str | None:
    """``net:[<inode>]`` of process *pid* (default: this one), or ``None``."""
    try:
        return os.readlink(f"/proc/{'self' if pid is None else pid}/ns/net")
    except OSError:
        return None
