"""Reaping: terminate what a session leaked, then clear its files.

`reap_session` runs the leak check, then ends the leaked processes, whole
trees, leaves first, with an escalation each step of which waits *grace*
seconds: ``SIGINT`` (a tractor actor cancels cleanly on it), ``SIGTERM``,
then ``SIGKILL``. Right before every signal the process's identity (pid and
creation time) is checked again, so a pid the kernel recycled meanwhile is
never signalled; only processes the leak check attributed to the session,
and only the user's own, are ever signalled.

Afterwards the check runs again (a process may have forked while dying; up
to `MAX_ROUNDS` rounds), stale socket files are removed, and, when the
session is then clean and its owner gone, its bindspace and record too. A
live socket's file is left to the process listening on it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import stat
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final, Literal

import msgspec
import psutil

from harness.attribution import same_create_time
from harness.leak_report import short_command
from harness.leaks import LeakedProcess, LeakReport, check_leaks, probe_socket
from harness.records import SessionRecord, SessionStore

log = logging.getLogger("harness.reap")

#: The signals sent in turn, each followed by a wait of the grace period.
ESCALATION: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)

#: The wait after ``SIGKILL`` lasts at least this long: the kernel still has
#: to tear the process down, which is quick but not instant on a busy host.
KILL_WAIT: Final = 2.0

#: Default seconds to wait after each signal.
DEFAULT_GRACE: Final = 3.0

#: Check-and-terminate rounds before giving up on processes that keep
#: appearing (a parent forking new children while it is being reaped).
MAX_ROUNDS: Final = 3

Outcome = Literal["reaped", "survived", "zombie", "gone"]


class ReapedProcess(msgspec.Struct, kw_only=True):
    """What became of one leaked process."""

    pid: int
    create_time: float
    name: str
    cmdline: list[str]
    how: list[str]
    outcome: Outcome
    """``reaped``: ended after a signal; ``gone``: exited before any signal
    was needed; ``zombie``: already dead, waiting for its parent to collect
    it; ``survived``: still running after ``SIGKILL``, or not ours to
    signal."""
    signal: str | None = None
    """The last signal sent before it ended, e.g. ``SIGTERM``."""
    note: str = ""


class ReapResult(msgspec.Struct, kw_only=True):
    """What `reap_session` did, or with ``dry_run`` would do."""

    session: str
    dry_run: bool
    grace: float
    before: LeakReport
    after: LeakReport
    processes: list[ReapedProcess] = msgspec.field(default_factory=list)
    removed_sockets: list[str] = msgspec.field(default_factory=list)
    kept_sockets: list[str] = msgspec.field(default_factory=list)
    removed_bindspace: bool = False
    removed_record: bool = False
    plan: list[str] = msgspec.field(default_factory=list)
    """With ``dry_run``: the actions it would take, in order."""

    @property
    def survived(self) -> list[ReapedProcess]:
        return [p for p in self.processes if p.outcome == "survived"]

    @property
    def clean(self) -> bool:
        """Nothing is left but zombies, which their parent collects."""
        after = self.after
        return (
            not [p for p in after.processes if not p.zombie]
            and not after.sockets
            and not after.listeners
        )


# ------------------------------------------------------------- processes


def _verified(target: LeakedProcess) -> psutil.Process | None:
    """*target* as a `psutil.Process` if it still is the same process."""
    try:
        proc = psutil.Process(target.pid)
        if not same_create_time(proc.create_time(), target.create_time):
            return None
        if proc.uids().real != os.getuid():
            return None
        return proc
    except psutil.NoSuchProcess:
        return None


def _ended(proc: psutil.Process) -> bool:
    """Whether *proc* has exited (collected, or a zombie awaiting collection).

    A child of this process is collected here, so it does not linger.
    """
    try:
        proc.wait(timeout=0)
        return True
    except psutil.TimeoutExpired:
        pass
    except psutil.NoSuchProcess:
        return True
    try:
        return bool(proc.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def _wait(procs: dict[int, psutil.Process], timeout: float) -> set[int]:
    """Wait up to *timeout* s for *procs* to end; return the pids that did."""
    ended: set[int] = set()
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        ended.update(pid for pid, p in procs.items() if pid not in ended and _ended(p))
        if len(ended) == len(procs) or time.monotonic() >= deadline:
            return ended
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.1)


def _depths(targets: Sequence[LeakedProcess]) -> dict[int, int]:
    """Depth of each target in the forest the targets form (roots are 0)."""
    parent = {t.pid: t.ppid for t in targets}
    depths: dict[int, int] = {}
    for pid in parent:
        depth, cursor, seen = 0, pid, {pid}
        while parent.get(cursor) in parent and parent[cursor] not in seen:
            cursor = parent[cursor]
            seen.add(cursor)
            depth += 1
        depths[pid] = depth
    return depths


def _outcome(
    target: LeakedProcess, outcome: Outcome, **extra: str | None
) -> ReapedProcess:
    """What became of *target*, with the details a report shows."""
    return ReapedProcess(
        pid=target.pid,
        create_time=target.create_time,
        name=target.name,
        cmdline=target.cmdline,
        how=target.how,
        outcome=outcome,
        **extra,  # type: ignore[arg-type]
    )


def terminate(
    targets: Sequence[LeakedProcess], grace: float = DEFAULT_GRACE
) -> list[ReapedProcess]:
    """End *targets*: leaves first, ``SIGINT``, ``SIGTERM``, then ``SIGKILL``.

    Each signal goes only to a process whose pid, creation time and user
    still match its target; after each round of signals the survivors get
    *grace* seconds. Returns one `ReapedProcess` per target.
    """
    me = os.getuid()
    outcomes: dict[int, ReapedProcess] = {}

    def done(target: LeakedProcess, outcome: Outcome, **extra: str | None) -> None:
        outcomes[target.pid] = _outcome(target, outcome, **extra)

    # Sort out first what cannot or need not be signalled.
    live: dict[int, tuple[LeakedProcess, psutil.Process]] = {}
    for target in targets:
        if target.uid != me:
            done(target, "survived", note=f"belongs to uid {target.uid}")
            continue
        proc = _verified(target)
        if proc is None:
            done(target, "gone", note="exited before it was signalled")
        elif target.zombie or _ended(proc):
            done(target, "zombie", note=f"dead; its parent {target.ppid} collects it")
        else:
            live[target.pid] = (target, proc)

    depth = _depths(targets)
    last: dict[int, str] = {}
    for sig in ESCALATION:
        if not live:
            break
        name = signal.Signals(sig).name
        # Leaves first, so a parent never outlives the signal to its children
        # only to start new ones.
        for pid in sorted(live, key=lambda p: -depth.get(p, 0)):
            target, proc = live[pid]
            if _verified(target) is None:
                continue  # ended (or recycled) since: it is not signalled
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                continue
            except psutil.AccessDenied:
                done(target, "survived", note=f"{name} was refused")
                continue
            last[pid] = name
            log.debug("Sent %s to %s (%s).", name, pid, target.name)
        live = {p: v for p, v in live.items() if p not in outcomes}
        timeout = max(grace, KILL_WAIT) if sig == signal.SIGKILL else grace
        for pid in _wait({p: v[1] for p, v in live.items()}, timeout):
            target, _ = live.pop(pid)
            done(target, "reaped", signal=last.get(pid))

    for target, _ in live.values():
        log.warning(
            "Process %s (%s) is still running after SIGKILL.", target.pid, target.name
        )
        done(target, "survived", signal=last.get(target.pid), note="outlived SIGKILL")
    return [outcomes[t.pid] for t in targets]


# ---------------------------------------------------------------- files


def _remove_stale_socket(path: str) -> bool:
    """Unlink *path* if it still is a socket nobody listens on."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except FileNotFoundError:
        return True
    if probe_socket(path) != "stale":
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    log.debug("Removed stale socket file %s.", path)
    return True


def _remove_bindspace(record: SessionRecord) -> bool:
    """Remove the session's bindspace, if it safely is what it should be.

    The record names the folder; it is removed only when its last component
    is the session id, it is a real folder (no symlink) and it is ours, so a
    damaged or forged record cannot point the removal anywhere else.
    """
    path = Path(record.bindspace)
    if path.name != record.id or not path.is_absolute():
        log.warning(
            "Not removing %s: it is not named after session %s.", path, record.id
        )
        return False
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        log.warning("Not removing %s: not a folder of this user.", path)
        return False
    shutil.rmtree(path)
    log.debug("Removed bindspace %s.", path)
    return True


# --------------------------------------------------------------- session


def _plan(report: LeakReport) -> list[str]:
    plan = []
    depth = _depths(report.processes)
    for proc in sorted(report.processes, key=lambda p: -depth.get(p.pid, 0)):
        command = short_command(proc.cmdline, proc.name)
        if proc.zombie:
            plan.append(f"leave zombie {proc.pid} ({command}) to its parent")
        else:
            plan.append(f"signal {proc.pid} ({command}): SIGINT, SIGTERM, SIGKILL")
    for sock in report.sockets:
        if sock.state == "stale":
            plan.append(f"remove stale socket file {sock.path}")
        else:
            plan.append(f"keep {sock.state} socket file {sock.path}")
    return plan


def reap_session(
    record: SessionRecord,
    *,
    grace: float = DEFAULT_GRACE,
    dry_run: bool = False,
    exclude_pids: Iterable[int] = (),
    remove_when_clean: bool = True,
) -> ReapResult:
    """Reap *record*'s session; see the module docstring for what that does.

    With *dry_run*, only check and say what would be done (``plan``). With
    *remove_when_clean* (the default), the bindspace and the record are
    removed once the session is clean and its owner gone; the runner passes
    ``False`` and closes its session itself.
    """
    exclude = tuple(exclude_pids)
    before = check_leaks(record, exclude_pids=exclude)
    if dry_run:
        plan = _plan(before)
        if not before.owner_alive and remove_when_clean:
            plan.append(
                f"if all of that succeeds: remove {record.bindspace} and the "
                "session record"
            )
        return ReapResult(
            session=record.id,
            dry_run=True,
            grace=grace,
            before=before,
            after=before,
            plan=plan,
        )

    log.info("Reaping session %s.", record.id)
    results: dict[tuple[int, float], ReapedProcess] = {}
    report = before
    for _ in range(MAX_ROUNDS):
        targets = [
            p
            for p in report.processes
            if not p.zombie and (p.pid, p.create_time) not in results
        ]
        if not targets:
            break
        for outcome in terminate(targets, grace):
            results[(outcome.pid, outcome.create_time)] = outcome
        report = check_leaks(record, exclude_pids=exclude)
    for proc in report.processes:
        key = (proc.pid, proc.create_time)
        if proc.zombie and key not in results:
            results[key] = _outcome(
                proc, "zombie", note=f"dead; its parent {proc.ppid} collects it"
            )
        elif not proc.zombie and (
            key not in results or results[key].outcome != "survived"
        ):
            results[key] = _outcome(
                proc,
                "survived",
                signal=results[key].signal if key in results else None,
                note="still there after the last round"
                if key in results
                else f"appeared during the last of {MAX_ROUNDS} rounds",
            )

    # Socket files: a listener that was just reaped left its file stale.
    removed, kept = [], []
    for sock in report.sockets:
        if sock.state == "stale" and _remove_stale_socket(sock.path):
            removed.append(sock.path)
        else:
            kept.append(sock.path)
    after = check_leaks(record, exclude_pids=exclude) if removed else report

    result = ReapResult(
        session=record.id,
        dry_run=False,
        grace=grace,
        before=before,
        after=after,
        processes=list(results.values()),
        removed_sockets=removed,
        kept_sockets=kept,
    )
    if remove_when_clean and result.clean and not after.owner_alive:
        result.removed_bindspace = _remove_bindspace(record)
        if result.removed_bindspace:
            with contextlib.suppress(OSError):
                SessionStore(Path(record.runtime_dir)).remove(record.id)
            result.removed_record = True
    log.info(
        "Session %s: %d reaped, %d survived, %d socket files removed.",
        record.id,
        sum(p.outcome == "reaped" for p in result.processes),
        len(result.survived),
        len(removed),
    )
    return result
