"""Child subreaper: adopt the session's orphans instead of leaving them to init.

When a process dies, the kernel re-parents its children to the nearest
ancestor marked a *child subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``,
Linux 3.4+), or to init when there is none. ``harness exec`` marks itself,
so a daemon that double-forks away from the test command stays below the
session's owner: it still shows up as the owner's descendant and its exit
status comes back to the owner.

That comes with a duty. An adopted orphan that exits is a zombie until its
new parent waits for it, and `subprocess.Popen` only waits for the processes
it started. `reap_adopted` waits for every other exited child. It first peeks
with ``waitid(..., WNOWAIT)``, which leaves the status in place, so the
direct child's status is never taken away from its ``Popen`` object.

Only a process whose every child is either adopted or excluded should call
`reap_adopted`: in a process that runs other subprocesses (a pytest run, say)
it would collect their statuses too. The runner of ``harness exec`` is such
a process; a `Session` used as a library does not become a subreaper unless
asked.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
from collections.abc import Container

log = logging.getLogger("harness.subreaper")

_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37

_libc: ctypes.CDLL | None = None


def _prctl() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    global _libc  # noqa: PLW0603
    if not sys.platform.startswith("linux"):
        return None
    if _libc is None:
        # The symbols already loaded into the interpreter include libc's;
        # ctypes.util.find_library would run `ldconfig -p` to find it again.
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc.prctl


def become_subreaper() -> bool:
    """Mark this process a child subreaper; return whether that worked.

    Always ``False`` off Linux. A failure is logged, not raised: the session
    still works, orphans just go to init (or an outer subreaper) instead.
    """
    prctl = _prctl()
    if prctl is None:
        log.debug("Not on Linux: orphans of the session go to init.")
        return False
    if prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        log.warning(
            "Could not become a child subreaper (%s); orphans of the session "
            "will be re-parented to init.",
            os.strerror(err),
        )
        return False
    log.debug("Process %d is now a child subreaper.", os.getpid())
    return True


def is_subreaper() -> bool:
    """Whether this process is marked a child subreaper (Linux only)."""
    prctl = _prctl()
    if prctl is None:
        return False
    flag = ctypes.c_int(0)
    if prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) != 0:
        return False
    return flag.value != 0


def child_pids() -> list[int]:
    """Pids of this process's children (from ``/proc``; empty elsewhere)."""
    pids: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir("/proc/self/task"):
            with (
                contextlib.suppress(OSError),
                open(f"/proc/self/task/{tid}/children", encoding="ascii") as f,
            ):
                pids.extend(int(p) for p in f.read().split())
    return pids


def reap_adopted(exclude: Container[int] = ()) -> list[tuple[int, int]]:
    """Wait for every exited child not in *exclude*; return ``(pid, status)``.

    Never blocks and never touches the status of a pid in *exclude* (pass
    the pids of the processes a ``Popen`` object waits for). *status* is a
    raw wait status (`os.waitstatus_to_exitcode` decodes it).
    """
    reaped: list[tuple[int, int]] = []
    flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, flags)
        except ChildProcessError:
            break
        if info is None:
            break
        if info.si_pid in exclude:
            # The kernel reports the excluded child first while its status
            # waits for Popen; look for exited adopted children by pid.
            reaped.extend(_reap_each(exclude))
            break
        with contextlib.suppress(ChildProcessError):
            pid, status = os.waitpid(info.si_pid, os.WNOHANG)
            if pid:
                reaped.append((pid, status))
    for pid, status in reaped:
        log.debug(
            "Reaped adopted process %d (exit %d).",
            pid,
            os.waitstatus_to_exitcode(status),
        )
    return reaped


def _reap_each(exclude: Container[int]) -> list[tuple[int, int]]:
    reaped = []
    for child in child_pids():
        if child in exclude:
            continue
        with contextlib.suppress(ChildProcessError):
            pid, status = os.waitpid(child, os.WNOHANG)
            if pid:
                reaped.append((pid, status))
    return reaped
