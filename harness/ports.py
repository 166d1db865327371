"""Host-wide port leases: one registry port per session, unique on the host.

A lease is an exclusive ``flock`` on ``<lease-dir>/<port>.lock``, taken with
`filelock`'s `lock_descriptor`. The lease dir is shared by every user of the
host (``01777``, like ``/tmp``), so two sessions never hold the same port,
whichever process or user runs them. The lock belongs to the open file in the
owner process: when the owner exits, however it exits (SIGKILL and OOM
included), the kernel drops the lock and the port is free again. Nothing needs
cleaning up, and lock files are never deleted: deleting a lock file while
another process has it open is the classic unlink race (two holders, each
locking a different inode under the same name).

A lock alone does not make a port free: a program outside the harness may
listen on it. So a port is granted only after the caller, holding the lock,
has bound ``<host>:<port>`` twice (without and with ``SO_REUSEADDR``, the way
trio binds) and the wildcard address once, and closed the probe sockets.

Candidates come from the ``port_range=`` argument, ``$HARNESS_PORT_RANGE``
(``LO-HI``) or `default_port_range`: ports below the kernel's ephemeral range,
which the kernel never picks on its own for an outgoing connection. The walk
starts at a random offset so that concurrent sessions do not all queue for
the same first port.

What a caller must know:

- Keep the `PortLease` object or call `PortLease.release`: the lease lasts
  until then or until the process exits. Dropping the object does not end it.
- Children never hold a lease. The lock's descriptor is close-on-exec, and a
  child made by ``os.fork`` without exec closes its copy at once (as
  `filelock`'s own locks do), so the lease ends with the process that took it.
- A lock file is used only if it belongs to you or to the lease dir's owner
  (root, normally). Anyone else who owns a file in a sticky dir could swap it
  for another while we hold the lock, so such ports are skipped.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import ipaddress
import logging
import os
import random
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

from filelock import lock_descriptor, unlock_descriptor

from harness.errors import HarnessError

log = logging.getLogger("harness.ports")

#: Overrides the host-wide lease dir (tests, or hosts whose temp dir is odd).
LEASE_DIR_ENV: Final = "HARNESS_LEASE_DIR"
#: ``LO-HI``: the ports to lease from, both ends included.
PORT_RANGE_ENV: Final = "HARNESS_PORT_RANGE"

#: Lowest port of the default range: clear of the well-known ports and of
#: tractor's hard-coded registry port 1616.
DEFAULT_RANGE_LOW: Final = 20000
#: A default range narrower than this is not worth having; see
#: `default_port_range`.
MIN_DEFAULT_SPAN: Final = 1000
#: Used when every part of the port space above `DEFAULT_RANGE_LOW` is
#: ephemeral: a lease still works, the kernel may just pick the port first.
FALLBACK_RANGE: Final = (20000, 29999)
#: Ports below this need privileges; the harness does not lease them.
LOWEST_PORT: Final = 1024
HIGHEST_PORT: Final = 65535

#: flock needs only a descriptor open for reading, so a lock file readable by
#: all can be locked by all; nobody ever writes to one. Set with fchmod after
#: creating it, whatever the umask.
LOCK_FILE_MODE: Final = 0o644
LEASE_DIR_MODE: Final = 0o1777

_OPEN_FLAGS: Final = (
    os.O_RDONLY
    | os.O_CLOEXEC
    | os.O_NOCTTY
    # A symlink planted in the shared dir must not make us lock, or create,
    # some other file.
    | os.O_NOFOLLOW
    # A FIFO planted under a lock file's name must not block the open.
    | os.O_NONBLOCK
)

#: Errors of the lease dir as a whole: no other port would fare better.
_DIR_ERRNOS: Final = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT})
#: flock is not available on the lease dir's file system (some FUSE mounts;
#: NFS emulates it with write locks, which a read-only descriptor cannot take:
#: EBADF). A lease dir belongs on a local disk or tmpfs.
_NO_FLOCK_ERRNOS: Final = frozenset(
    {
        errno.ENOLCK,
        errno.ENOSYS,
        errno.EOPNOTSUPP,
        errno.ENOTSUP,
        errno.EINVAL,
        errno.EBADF,
    }
)


class _LeaseTable:
    """This process's leases and lock descriptors."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # Strong references to every unreleased lease: a lease lives until
        # `release()` or process exit, never until the garbage collector runs.
        self.held: set[PortLease] = set()
        # Every lock descriptor open, held or being tried; a forked child
        # closes them all (see `_forget_leases_in_child`).
        self.fds: set[int] = set()


_TABLE = _LeaseTable()


@dataclass(frozen=True, slots=True)
class PortHolder:
    """The process holding a lease, as the kernel's lock table reports it."""

    port: int
    pid: int | None
    """None when the kernel's table cannot be read (not Linux) or does not
    show the holder (another pid namespace)."""
    uid: int | None
    create_time: float | None
    """The holder's start time (`psutil`), to tell a recycled pid apart."""
    path: Path


class PortLease:
    """An exclusive claim on one TCP port, held until `release`.

    Use it as a context manager or call `release` (idempotent). ``port`` is
    the leased port, ``path`` the lock file, ``host`` the address the port was
    probed on; ``address`` is ``(host, port)``, ready for a registry address.
    Built by `lease_port`, never directly.
    """

    port: int
    path: Path
    host: str

    def __init__(self, port: int, path: Path, host: str, fd: int) -> None:
        self.port = port
        self.path = path
        self.host = host
        self._fd: int | None = fd
        self._owner_pid = os.getpid()
        with _TABLE.lock:
            _TABLE.held.add(self)

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def held(self) -> bool:
        """Whether this process still holds the lease (False after `release`)."""
        return self._fd is not None and os.getpid() == self._owner_pid

    def release(self) -> None:
        """Give the port back. Calling it again, or in a forked child, is a no-op."""
        with _TABLE.lock:
            fd, self._fd = self._fd, None
            _TABLE.held.discard(self)
            if fd is not None:
                _TABLE.fds.discard(fd)
        if fd is None or os.getpid() != self._owner_pid:
            return
        log.debug("Releasing the lease on port %d (%s).", self.port, self.path)
        try:
            unlock_descriptor(fd)
        finally:
            os.close(fd)
        log.debug("Released the lease on port %d.", self.port)

    def __enter__(self) -> PortLease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "held" if self.held else "released"
        return f"<PortLease {self.host}:{self.port} {state} {str(self.path)!r}>"


def _forget_leases_in_child() -> None:
    """After ``os.fork``: close the parent's lock descriptors in the child.

    flock belongs to the open file, which parent and child share after a
    fork; were the child to keep its copy, a lease would outlive its owner as
    long as any forked worker lives. Closing the copy leaves the parent's
    lock untouched. The state lock is replaced, since another thread of the
    parent may have held it at the moment of the fork.
    """
    _TABLE.lock = threading.Lock()
    for fd in _TABLE.fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    _TABLE.fds.clear()
    for lease in _TABLE.held:
        lease._fd = None
    _TABLE.held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_leases_in_child)


# --- the lease dir ----------------------------------------------------------


def lease_dir(env: Mapping[str, str] | None = None) -> Path:
    """The host-wide lease dir, created ``01777`` if missing, and checked.

    ``$HARNESS_LEASE_DIR`` if set (in *env*, default `os.environ`), else
    ``<tempfile.gettempdir()>/harness-leases``. Raises `HarnessError` when the
    folder is unsafe to share: a symlink, not a folder, owned by someone other
    than root or the current user, or writable by others without the sticky
    bit. The message names the fix.
    """
    source = os.environ if env is None else env
    value = source.get(LEASE_DIR_ENV)
    if value:
        return _checked_lease_dir(Path(value), f"${LEASE_DIR_ENV}")
    return _checked_lease_dir(
        Path(tempfile.gettempdir()) / "harness-leases", "the default lease dir"
    )


def _given_or_default_dir(given: Path | None) -> Path:
    if given is None:
        return lease_dir()
    return _checked_lease_dir(Path(given), "the lease_dir argument")


def _checked_lease_dir(path: Path, origin: str) -> Path:
    fix = f"set ${LEASE_DIR_ENV} to a folder of your own (it is created if missing)"
    if not path.is_absolute():
        msg = f"{origin} {str(path)!r} is not an absolute path; {fix}"
        raise HarnessError(msg)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        _create_lease_dir(path, origin, fix)
        st = os.lstat(path)
    except OSError as exc:
        msg = f"{origin} {str(path)!r} cannot be inspected: {exc.strerror}; {fix}"
        raise HarnessError(msg) from None

    # lstat, not stat: a symlink planted in a shared /tmp by another user
    # would otherwise redirect every lock file into a folder they control.
    if stat.S_ISLNK(st.st_mode):
        msg = (
            f"{origin} {str(path)!r} is a symlink (to {_readlink(path)!r}); the "
            f"harness never follows links to its lease dir. Remove the link if "
            f"it is not yours to keep, or {fix}"
        )
        raise HarnessError(msg)
    if not stat.S_ISDIR(st.st_mode):
        msg = f"{origin} {str(path)!r} is not a folder; remove it, or {fix}"
        raise HarnessError(msg)

    # The owner of the folder may delete or rename any file in it, sticky bit
    # or not, and so end other users' leases: only root or you will do.
    uid = os.geteuid()
    if st.st_uid not in (0, uid):
        msg = (
            f"{origin} {str(path)!r} belongs to uid {st.st_uid}, neither root "
            f"nor you (uid {uid}), and its owner could delete the lock files of "
            f"held leases. Have root create it (`install -d -m 1777 {path}`), "
            f"or {fix}"
        )
        raise HarnessError(msg)
    mode = stat.S_IMODE(st.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH) and not mode & stat.S_ISVTX:
        msg = (
            f"{origin} {str(path)!r} is writable by others (mode {mode:04o}) "
            f"without the sticky bit, so anyone could delete the lock files of "
            f"held leases. Run `chmod +t {path}` if it is yours, or {fix}"
        )
        raise HarnessError(msg)
    if not os.access(path, os.W_OK | os.X_OK):
        msg = (
            f"{origin} {str(path)!r} (mode {mode:04o}, uid {st.st_uid}) does not "
            f"let you create lock files in it; {fix}"
        )
        raise HarnessError(msg)
    return path


def _create_lease_dir(path: Path, origin: str, fix: str) -> None:
    """Create *path* as a shared ``01777`` folder, if nobody beats us to it."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return  # another process made it first; the caller checks it as found
    except OSError as exc:
        msg = f"cannot create {origin} {str(path)!r}: {exc.strerror}; {fix}"
        raise HarnessError(msg) from None
    # Widen it through a descriptor of the folder we just made: should it be
    # swapped for a link in between, O_NOFOLLOW refuses rather than chmod-ing
    # the link's target.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(fd, LEASE_DIR_MODE)
    finally:
        os.close(fd)
    log.info("Created the lease dir %s (mode 1777, shared by every user).", path)


def _readlink(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


# --- the port range ---------------------------------------------------------


@functools.cache
def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for automatically chosen local ports (cached)."""
    if sys.platform.startswith("linux"):
        try:
            text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
            low, high = (int(part) for part in text.split())
            return (low, high)
        except (OSError, ValueError):
            log.debug("Cannot read the ephemeral port range; assuming 32768-60999.")
            return (32768, 60999)
    if sys.platform == "darwin" or "bsd" in sys.platform:
        try:
            out = subprocess.run(
                [
                    "sysctl",
                    "-n",
                    "net.inet.ip.portrange.first",
                    "net.inet.ip.portrange.last",
                ],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout
            low, high = (int(part) for part in out.split())
            return (low, high)
        except (OSError, ValueError, subprocess.SubprocessError):
            log.debug("Cannot ask sysctl for the ephemeral range; assuming IANA's.")
    return (49152, 65535)


@functools.cache
def _reserved_ports() -> tuple[tuple[int, int], ...]:
    """``ip_local_reserved_ports`` as ``(low, high)`` spans (cached; Linux only).

    Ports reserved there are set aside by the admin for some service that
    binds them explicitly; leasing them would hand that service's port out.
    """
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_reserved_ports").read_text().strip()
    except OSError:
        return ()
    spans: list[tuple[int, int]] = []
    for part in filter(None, text.split(",")):
        low, _, high = part.partition("-")
        try:
            spans.append((int(low), int(high or low)))
        except ValueError:
            log.debug("Ignoring %r in ip_local_reserved_ports.", part)
    return tuple(spans)


def default_port_range() -> tuple[int, int]:
    """Ports to lease from when nothing is configured, both ends included.

    From 20000 up to just below the kernel's ephemeral range (on Linux
    ``/proc/sys/net/ipv4/ip_local_port_range``, on macOS ``sysctl
    net.inet.ip.portrange``), e.g. 20000-32767 on a stock Linux. If that
    leaves fewer than 1000 ports, the ports above the ephemeral range are used
    when there are 1000 of them; else 20000-29999 with a logged warning.
    """
    eph_low, eph_high = _ephemeral_range()
    below = (DEFAULT_RANGE_LOW, eph_low - 1)
    above = (max(eph_high + 1, DEFAULT_RANGE_LOW), HIGHEST_PORT)
    best = max(below, above, key=lambda span: span[1] - span[0])
    if best[1] - best[0] + 1 >= MIN_DEFAULT_SPAN:
        return best
    log.warning(
        "The kernel's ephemeral port range %d-%d leaves no room for leases; using "
        "%d-%d, which the kernel may also hand out. Set $%s=LO-HI to choose.",
        eph_low,
        eph_high,
        *FALLBACK_RANGE,
        PORT_RANGE_ENV,
    )
    return FALLBACK_RANGE


def configured_port_range(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``$HARNESS_PORT_RANGE`` (``LO-HI``) if set, else `default_port_range`.

    Raises `HarnessError` for a malformed or out-of-bounds value.
    """
    source = os.environ if env is None else env
    value = source.get(PORT_RANGE_ENV)
    if not value:
        return default_port_range()
    low, sep, high = value.strip().partition("-")
    try:
        if not sep:
            raise ValueError(value)
        span = (int(low), int(high))
    except ValueError:
        msg = (
            f"${PORT_RANGE_ENV} is {value!r}; expected LO-HI, two port numbers "
            f"such as '20000-32767'. Fix or unset it"
        )
        raise HarnessError(msg) from None
    return _checked_range(span, f"${PORT_RANGE_ENV}")


def _checked_range(span: object, origin: str) -> tuple[int, int]:
    if (
        not isinstance(span, tuple)
        or len(span) != 2
        or not all(isinstance(end, int) and not isinstance(end, bool) for end in span)
    ):
        msg = (
            f"the port range from {origin} is {span!r}; expected a tuple of two "
            f"ints (low, high), such as (20000, 32767)"
        )
        raise HarnessError(msg)
    low, high = span
    if not LOWEST_PORT <= low <= high <= HIGHEST_PORT:
        msg = (
            f"the port range {low}-{high} from {origin} is not within "
            f"{LOWEST_PORT}-{HIGHEST_PORT} with low <= high; choose e.g. "
            f"20000-32767 (below the kernel's ephemeral range)"
        )
        raise HarnessError(msg)
    eph_low, eph_high = _ephemeral_range()
    if low <= eph_high and high >= eph_low:
        log.debug(
            "The port range %d-%d overlaps the ephemeral range %d-%d; the kernel "
            "may bind a leased port for an outgoing connection before its holder.",
            low,
            high,
            eph_low,
            eph_high,
        )
    return (low, high)


def _is_reserved(port: int) -> bool:
    return any(low <= port <= high for low, high in _reserved_ports())


# --- probing ----------------------------------------------------------------


@functools.cache
def _family_of(host: str) -> tuple[socket.AddressFamily, str]:
    """The address family of *host* and its wildcard address (cached).

    Raises `HarnessError` unless *host* is an IP address of this machine.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        msg = (
            f"host {host!r} is not an IP address; leases are probed by binding, "
            f"so pass the address the port will be bound on, e.g. '127.0.0.1'"
        )
        raise HarnessError(msg) from None
    family, wildcard = (
        (socket.AF_INET6, "::") if address.version == 6 else (socket.AF_INET, "0.0.0.0")
    )
    # Every probe would fail for an address this host does not have, and the
    # walk would blame each port; say what is wrong once instead.
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, 0))
        except OSError as exc:
            msg = (
                f"cannot bind to host {host!r}: {exc.strerror}; pass an address "
                f"of this machine, e.g. '127.0.0.1'"
            )
            raise HarnessError(msg) from None
    return (family, wildcard)


def _bind_problem(host: str, port: int) -> str | None:
    """Why *port* cannot be bound on *host* now, or None if it can.

    Three binds, each on a fresh socket that is closed at once (a socket that
    never listened or connected leaves no TIME_WAIT behind):

    1. ``host`` without ``SO_REUSEADDR``: fails for any socket on the port,
       including connections lingering in TIME_WAIT;
    2. ``host`` with ``SO_REUSEADDR``, as trio and tractor bind: fails for a
       listener, and for sockets bound under the other option semantics
       (BSD/macOS differ from Linux here);
    3. the wildcard address with ``SO_REUSEADDR``: fails for a listener on
       *any* local address, so a port some daemon serves on the LAN address
       is skipped even though the loopback bind would succeed. A session
       whose target binds the wildcard would collide with it.
    """
    family, wildcard = _family_of(host)
    for address, reuse in ((host, False), (host, True), (wildcard, True)):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if reuse:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
        except OSError as exc:
            option = "with" if reuse else "without"
            return f"bind to {address}:{port} {option} SO_REUSEADDR: {exc.strerror}"
        finally:
            sock.close()
    return None


# --- leasing ----------------------------------------------------------------


class _NoFlock(Exception):
    """The lease dir's file system refuses flock."""


def _try_lock(path: Path, dir_uid: int) -> int | str | None:
    """Open and lock *path*: the descriptor, None if held, or why it is unusable.

    Raises `_NoFlock` when flock itself is unsupported and `OSError` for
    errors of the whole lease dir (read-only, full).
    """
    created = False
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        try:
            fd = os.open(path, _OPEN_FLAGS | os.O_CREAT | os.O_EXCL, LOCK_FILE_MODE)
            created = True
        except FileExistsError:
            fd = os.open(path, _OPEN_FLAGS)  # a racing creator won; use theirs
    with _TABLE.lock:
        _TABLE.fds.add(fd)
    keep = False
    try:
        st = os.fstat(fd)
        if created and stat.S_IMODE(st.st_mode) != LOCK_FILE_MODE:
            os.fchmod(fd, LOCK_FILE_MODE)  # a umask other than 022 narrowed it
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        if st.st_nlink != 1:
            # A second name for the file: two ports could share one lock, or
            # the name stands for a file that is not ours to lock.
            return f"{st.st_nlink} hard links"
        if st.st_uid not in (os.geteuid(), dir_uid):
            return f"owned by uid {st.st_uid}, who could replace it during a lease"
        try:
            if not lock_descriptor(fd, blocking=False):
                return None
        except OSError as exc:
            if exc.errno in _NO_FLOCK_ERRNOS:
                raise _NoFlock(exc.strerror or str(exc)) from None
            raise
        # Between open and lock, the file's owner may have replaced it; a
        # lock on an inode that no longer has the name locks nothing.
        try:
            current = os.lstat(path)
        except FileNotFoundError:
            return None
        if not os.path.samestat(current, st):
            return None
        keep = True
        return fd
    finally:
        if not keep:
            _close_lock_fd(fd)


def _close_lock_fd(fd: int) -> None:
    """Close a lock descriptor that is no lease (closing drops its lock)."""
    with _TABLE.lock:
        _TABLE.fds.discard(fd)
    os.close(fd)


def lease_port(
    *,
    port_range: tuple[int, int] | None = None,
    lease_dir: Path | None = None,
    host: str = "127.0.0.1",
) -> PortLease:
    """Lease a port no other live lease on the host holds, and that binds now.

    *port_range* ``(low, high)`` (both included) overrides
    ``$HARNESS_PORT_RANGE`` and `default_port_range`; *lease_dir* overrides
    the host-wide lease dir (it is checked the same way); *host* is the IP
    address the port is probed on and meant for.

    Raises `HarnessError` when the range, the lease dir or the host is bad,
    when the lease dir's file system cannot lock, or when no port of the range
    is free; that message counts the ports leased by others, in use by other
    sockets and with unusable lock files.
    """
    if port_range is None:
        span = configured_port_range()
        origin = (
            f"from ${PORT_RANGE_ENV}"
            if os.environ.get(PORT_RANGE_ENV)
            else "the default range"
        )
    else:
        span = _checked_range(port_range, "the port_range argument")
        origin = "from the port_range argument"
    directory = _given_or_default_dir(lease_dir)
    dir_uid = os.lstat(directory).st_uid
    _family_of(host)

    low, high = span
    count = high - low + 1
    start = random.randrange(count)
    log.debug(
        "Leasing a port in %d-%d for %s from %s, starting at %d.",
        low,
        high,
        host,
        directory,
        low + start,
    )
    skipped: Counter[str] = Counter()
    first_unusable = ""
    for step in range(count):
        port = low + (start + step) % count
        if _is_reserved(port):
            skipped["reserved"] += 1
            continue
        path = directory / f"{port}.lock"

        # Lock first, then probe: while we hold the lock no other harness
        # process can be granted the port, so a probe that passes stays true
        # for everyone but programs outside the harness.
        planted_link = False
        try:
            outcome = _try_lock(path, dir_uid)
        except _NoFlock as exc:
            msg = (
                f"the file system of the lease dir {str(directory)!r} does not "
                f"support flock ({exc}); leases need it to end when their owner "
                f"dies. Set ${LEASE_DIR_ENV} to a folder on a local disk or tmpfs"
            )
            raise HarnessError(msg) from None
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                msg = (
                    f"cannot open a lock file for port {port}: {exc.strerror}. "
                    f"Each held lease keeps one file descriptor open; release "
                    f"leases you no longer need or raise the limit (ulimit -n)"
                )
                raise HarnessError(msg) from None
            if exc.errno in _DIR_ERRNOS:
                msg = (
                    f"cannot create lock files in the lease dir "
                    f"{str(directory)!r}: {exc.strerror}; free space or set "
                    f"${LEASE_DIR_ENV} to another folder"
                )
                raise HarnessError(msg) from None
            outcome = exc.strerror or str(exc)
            planted_link = exc.errno == errno.ELOOP
        if outcome is None:
            skipped["leased"] += 1
            continue
        if isinstance(outcome, str):
            # A symlink (ELOOP), another user's private file (EACCES), a
            # folder, a hard link: not a lock file to trust, not a port to use.
            skipped["unusable"] += 1
            first_unusable = first_unusable or f"{str(path)!r}: {outcome}"
            # A symlink in a sticky shared dir was put there by someone on
            # purpose: worth a word to the user.
            level = logging.WARNING if planted_link else logging.DEBUG
            log.log(level, "Skipping port %d: %s: %s.", port, path, outcome)
            continue

        try:
            problem = _bind_problem(host, port)
        except BaseException:
            _close_lock_fd(outcome)
            raise
        if problem is not None:
            _close_lock_fd(outcome)
            skipped["in use"] += 1
            log.debug("Skipping port %d: %s.", port, problem)
            continue

        log.debug("Leased port %d (%s), candidate %d.", port, path, step + 1)
        return PortLease(port, path, host, outcome)

    msg = (
        f"no free port in {low}-{high} ({origin}) for {host}. Of {count} "
        f"ports: {skipped['leased']} leased by live sessions, "
        f"{skipped['in use']} in use by other sockets, "
        f"{skipped['unusable']} with unusable lock files in {str(directory)!r}"
        + (f" (first: {first_unusable})" if first_unusable else "")
        + f", {skipped['reserved']} reserved by the kernel. End sessions you "
        f"no longer need, or widen the range with ${PORT_RANGE_ENV}=LO-HI or "
        f"port_range="
    )
    raise HarnessError(msg)


# --- inspection -------------------------------------------------------------


def port_is_leased(port: int, *, lease_dir: Path | None = None) -> bool:
    """Whether a live process (this one included) holds the lease on *port*.

    Checks by trying a shared, non-blocking lock on the lock file, which any
    exclusive holder refuses. Never creates a file. A lock file that cannot be
    opened for reading counts as leased (we cannot tell); a symlink or a
    missing file does not (no lease can be held through either).
    """
    directory = _given_or_default_dir(lease_dir)
    return _lock_file_held(directory / f"{port}.lock")


def _lock_file_held(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as exc:
        return exc.errno != errno.ELOOP
    try:
        # The same primitive `filelock` uses (flock), in shared mode so that
        # two inspectors never refuse each other.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return True
        raise
    finally:
        os.close(fd)  # also drops our shared lock
    return False


def port_holder(port: int, *, lease_dir: Path | None = None) -> PortHolder | None:
    """The process holding the lease on *port*, or None if nobody holds it.

    Diagnostics: the holder's pid comes from the kernel's table of locks
    (``/proc/locks``, Linux), so it is never stale; uid and start time come
    from the process. Where the table is unavailable the fields are None.
    """
    directory = _given_or_default_dir(lease_dir)
    path = directory / f"{port}.lock"
    if not _lock_file_held(path):
        return None
    pid = uid = create_time = None
    with contextlib.suppress(OSError):
        pid = _flock_owner(os.lstat(path))
    if pid is not None:
        import psutil

        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            uid = proc.uids().real
            create_time = proc.create_time()
    return PortHolder(port=port, pid=pid, uid=uid, create_time=create_time, path=path)


def _flock_owner(st: os.stat_result) -> int | None:
    """The pid holding an exclusive flock on the file *st*, from /proc/locks.

    Lines read ``1: FLOCK  ADVISORY  WRITE <pid> <maj>:<min>:<inode> 0 EOF``
    (major and minor in hex); waiters carry a ``->`` and are skipped. Some
    file systems (btrfs) report a device in stat that differs from the
    table's, so a unique match on the inode alone is accepted too.
    """
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    by_inode: list[int] = []
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK" or fields[3] != "WRITE":
            continue
        where = fields[5].rsplit(":", 1)
        if len(where) != 2 or where[1] != str(st.st_ino):
            continue
        try:
            pid = int(fields[4])
        except ValueError:
            continue
        if where[0] == device:
            return pid if pid > 0 else None
        by_inode.append(pid)
    return by_inode[0] if len(by_inode) == 1 and by_inode[0] > 0 else None
