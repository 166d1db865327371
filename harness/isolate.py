"""Enforced isolation: run a session's command in private kernel namespaces.

Cooperative isolation (lease, bindspace, envelope) only helps a target that
reads the envelope. A target that hard-codes its addresses, as tractor's suite
does with its registry at ``127.0.0.1:1616`` and
``$XDG_RUNTIME_DIR/tractor/registry@1616.sock``, collides with every other
session on the host. This module removes those collisions:

- `private_env` points ``XDG_RUNTIME_DIR`` and ``XDG_CACHE_HOME`` into the
  session's bindspace, so fixed socket names are per session;
- level ``net`` runs the command in a new network namespace whose loopback is
  up, so ``127.0.0.1:1616`` is the session's own;
- level ``pid`` adds a pid namespace (with its own ``/proc``) whose init is
  `harness.nsinit`, so nothing the command starts can outlive the session;
- level ``auto`` takes the strongest level this host permits and says which.

Typical use, by the session runner::

    plan = isolate.plan(["auto"])
    argv = plan.wrap(["pytest", "tests"])
    proc = subprocess.Popen(argv, env=isolate.private_env(bindspace, env))
    plan.started(proc)          # the namespaces' ids, for the session record
    status = proc.wait()        # the command's own status
    ...                         # leak check: plan.processes(), plan.listeners()
    ended = plan.teardown()     # pid level: kill what is left, say what it was

Only the kernel's namespaces are used (``unshare(2)``), never a container
runtime or a daemon. Root may always create namespaces; an ordinary user may
where unprivileged user namespaces are allowed, which `detect` checks and
explains when they are not. Other platforms than Linux get cooperative
isolation only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NamedTuple, Protocol

from harness import nsinit
from harness.errors import HarnessError
from harness.runtime_dir import ensure_private_dir, harness_state_dir

log = logging.getLogger("harness.isolate")

#: What ``--isolate`` accepts. ``pid`` includes ``net``.
ISOLATION_LEVELS: Final = ("none", "net", "pid", "auto")

#: The script that enters the namespaces; run by path, see `IsolationPlan.wrap`.
NSINIT_SCRIPT: Final = Path(nsinit.__file__).resolve()

_CAP_NET_ADMIN: Final = 12
_CAP_SYS_ADMIN: Final = 21

_LEVEL_WORDS: Final = {
    "net": "a private network namespace",
    "pid": "private network and pid namespaces",
}

_OTHER_CHOICES: Final = (
    "Or use `--isolate auto` to take what this host permits (without namespaces a "
    "target that hard-codes 127.0.0.1:1616 may collide with another session), "
    "or `--isolate none`."
)


# --------------------------------------------------------------- detection


@dataclass(frozen=True)
class Finding:
    """One thing `detect` looked at: what, the value seen, and what it means."""

    check: str
    value: str
    meaning: str


@dataclass(frozen=True)
class Capabilities:
    """What this host permits this process, and why.

    *levels* holds the namespace levels (``net``, ``pid``) that can be used;
    *refusals* maps each level that cannot to a message with the reason and
    the fix. *privileged* means the process may create namespaces itself
    (``CAP_SYS_ADMIN``, as root has); otherwise they are created inside a new
    user namespace, which *user_namespaces* says is allowed.
    """

    platform: str
    uid: int
    privileged: bool
    user_namespaces: bool
    levels: tuple[str, ...]
    refusals: Mapping[str, str] = field(default_factory=dict)
    findings: tuple[Finding, ...] = ()
    probed: bool = False

    @property
    def mechanism(self) -> str:
        """How namespaces are created here: as root, via a user namespace, or not."""
        if not self.levels:
            return "none"
        return "privileged" if self.privileged else "user namespace"

    def best(self) -> str:
        """The strongest level permitted: ``pid``, ``net`` or ``none``."""
        for level in ("pid", "net"):
            if level in self.levels:
                return level
        return "none"

    def why_not(self, level: str) -> str:
        """The reason *level* is refused, with the fix; empty when permitted."""
        if level in self.levels or level == "none":
            return ""
        return self.refusals.get(level, f"isolation level {level!r} is not available")

    def render(self) -> str:
        """An aligned table of the findings and the verdict, for people."""
        width = max([len(f.check) for f in self.findings] + [5])
        value_width = max([len(f.value) for f in self.findings] + [5])
        lines = [f"{'check':<{width}}  {'value':<{value_width}}  meaning"]
        for finding in self.findings:
            lines.append(
                f"{finding.check:<{width}}  {finding.value:<{value_width}}  "
                f"{finding.meaning}"
            )
        lines.append("")
        lines.append(
            f"permitted: {', '.join(self.levels) or 'none'} "
            f"(mechanism: {self.mechanism}; `--isolate auto` picks {self.best()})"
        )
        for level, reason in self.refusals.items():
            lines.append(f"{level} refused: {reason}")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Sysctl:
    """A sysctl that, at one value, forbids unprivileged user namespaces."""

    name: str
    path: str  # below the proc root
    forbidding: int
    fix: str  # why, and what to do, when it forbids
    forbids: str  # the finding's meaning when it forbids
    ok: str  # ... and when it does not


_USERNS_SYSCTLS: Final = (
    _Sysctl(
        "user.max_user_namespaces",
        "sys/user/max_user_namespaces",
        0,
        "user.max_user_namespaces is 0 (no user namespaces at all); raise it "
        "with `sudo sysctl -w user.max_user_namespaces=15000`",
        "forbids user namespaces",
        "allows user namespaces",
    ),
    _Sysctl(
        "kernel.unprivileged_userns_clone",
        "sys/kernel/unprivileged_userns_clone",
        0,
        "kernel.unprivileged_userns_clone is 0 (Debian/Ubuntu switch for "
        "ordinary users); enable it with `sudo sysctl -w "
        "kernel.unprivileged_userns_clone=1`",
        "forbids them for ordinary users",
        "no restriction",
    ),
    _Sysctl(
        "kernel.apparmor_restrict_unprivileged_userns",
        "sys/kernel/apparmor_restrict_unprivileged_userns",
        1,
        "kernel.apparmor_restrict_unprivileged_userns is 1 (Ubuntu 24.04's "
        "default: a user namespace gets no capabilities unless an AppArmor "
        "profile allows it); either `sudo sysctl -w "
        "kernel.apparmor_restrict_unprivileged_userns=0`, or give the Python "
        "interpreter an AppArmor profile with the `userns,` rule",
        "restricts them (AppArmor)",
        "no restriction",
    ),
)


def detect(
    *,
    proc_root: Path | str = "/proc",
    platform: str | None = None,
    probe: bool = True,
    python: str | None = None,
) -> Capabilities:
    """Find out which isolation levels this host permits this process, and why.

    Reads the process's uid and capabilities and the sysctls that govern
    unprivileged user namespaces under *proc_root* (point it at a fake tree
    to see how another host would be judged). With *probe* (the default, and
    only meaningful with the real ``/proc``) it also enters each level once
    in a throwaway process, which catches what no sysctl shows (a seccomp
    filter, an AppArmor profile, a masked ``/proc``); the probe's result is
    kept for the life of this process. Never raises for a refusal: the
    result says why.
    """
    platform = sys.platform if platform is None else platform
    root = Path(proc_root)
    findings: list[Finding] = []

    if not platform.startswith("linux"):
        reason = (
            f"{platform!r} has no kernel namespaces, so only cooperative isolation "
            "(port lease, bindspace, envelope) is available; run sessions of a "
            "target that hard-codes its addresses one at a time there"
        )
        findings.append(
            Finding("platform", platform, "no namespaces: cooperative only")
        )
        return Capabilities(
            platform=platform,
            uid=os.getuid(),
            privileged=False,
            user_namespaces=False,
            levels=(),
            refusals={"net": reason, "pid": reason},
            findings=tuple(findings),
        )
    findings.append(Finding("platform", platform, "kernel namespaces exist"))

    uid, cap_eff = _identity(root)
    privileged = bool(cap_eff >> _CAP_SYS_ADMIN & 1 and cap_eff >> _CAP_NET_ADMIN & 1)
    findings.append(
        Finding(
            "privileges",
            f"uid {uid}, CAP_SYS_ADMIN {'yes' if privileged else 'no'}",
            "may create namespaces itself"
            if privileged
            else "needs an unprivileged user namespace",
        )
    )

    # Each sysctl below can forbid unprivileged user namespaces on its own.
    blockers: list[str] = []
    for check in _USERNS_SYSCTLS:
        value = _read_int(root / check.path)
        forbids = value == check.forbidding
        if forbids:
            blockers.append(check.fix)
        findings.append(
            Finding(check.name, _shown(value), check.forbids if forbids else check.ok)
        )
    user_namespaces = not blockers
    findings.append(
        Finding(
            "unshare(2) from Python",
            "os.unshare" if hasattr(os, "unshare") else "ctypes (libc)",
            "how harness.nsinit enters namespaces",
        )
    )
    binary = shutil.which("unshare")
    findings.append(
        Finding(
            "unshare binary",
            binary or "not found",
            "not needed by the harness; handy for trying namespaces by hand",
        )
    )

    # The static verdict.
    refusals: dict[str, str] = {}
    if privileged or user_namespaces:
        levels: tuple[str, ...] = ("net", "pid")
    else:
        levels = ()
        reason = (
            f"this process is not privileged (uid {uid}, no CAP_SYS_ADMIN) and "
            "ordinary users may not create user namespaces here: "
            + "; and ".join(blockers)
            + "; or run the session as root"
        )
        refusals = {"net": reason, "pid": reason}

    # The probe overrules the sysctls in both directions: an AppArmor profile
    # may allow what the sysctl restricts, and seccomp (Docker's default)
    # forbids what every sysctl allows.
    if probe and root == Path("/proc"):
        results = _probe(python or sys.executable, userns=not privileged)
        for level in ("net", "pid"):
            error = results.get(level, "no probe result")
            findings.append(
                Finding(
                    f"probe: {level}",
                    "works" if error is None else "refused",
                    "entered once in a throwaway process"
                    if error is None
                    else str(error),
                )
            )
        levels = tuple(level for level in ("net", "pid") if results.get(level) is None)
        refusals = {
            level: refusals.get(level) or _probe_refusal(level, str(error), privileged)
            for level, error in results.items()
            if error is not None
        }
        return Capabilities(
            platform=platform,
            uid=uid,
            privileged=privileged,
            user_namespaces=user_namespaces,
            levels=levels,
            refusals=refusals,
            findings=tuple(findings),
            probed=True,
        )
    return Capabilities(
        platform=platform,
        uid=uid,
        privileged=privileged,
        user_namespaces=user_namespaces,
        levels=levels,
        refusals=refusals,
        findings=tuple(findings),
    )


def _identity(root: Path) -> tuple[int, int]:
    """The effective uid and effective capability mask from ``self/status``."""
    uid, cap_eff = os.geteuid(), 0
    try:
        text = (root / "self/status").read_text()
    except OSError:
        return uid, cap_eff
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "Uid":
            uid = int(value.split()[1])
        elif key == "CapEff":
            cap_eff = int(value.strip(), 16)
    return uid, cap_eff


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _shown(value: int | None) -> str:
    return "absent" if value is None else str(value)


_probe_results: dict[tuple[str, bool], dict[str, str | None]] = {}


def _probe(python: str, *, userns: bool) -> dict[str, str | None]:
    key = (python, userns)
    if key in _probe_results:
        return _probe_results[key]
    argv = [python, "-I", "-S", str(NSINIT_SCRIPT), "--probe"]
    if userns:
        argv.append("--userns")
    log.debug("Probing namespaces with %s.", argv)
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=30, check=False
        )
        results: dict[str, str | None] = json.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        detail = f"the probe {argv!r} failed: {exc}"
        results = {"net": detail, "pid": detail}
    log.debug("Probe results: %s.", results)
    _probe_results[key] = results
    return results


def _probe_refusal(level: str, error: str, privileged: bool) -> str:
    who = "even as root" if privileged else "as this user"
    fix = (
        "a seccomp filter or security module forbids unshare(2); in a container, "
        "run it with `--privileged` or `--cap-add SYS_ADMIN --security-opt "
        "seccomp=unconfined`"
    )
    if "mount /proc" in error:
        fix = (
            "the pid namespace could not mount its own /proc (a container that "
            "masks /proc forbids it); use `--isolate net`, which needs no mount"
        )
    return f"entering {_LEVEL_WORDS[level]} failed {who}: {error}; {fix}"


# ------------------------------------------------------------------ the plan


class _HasPid(Protocol):
    @property
    def pid(self) -> int: ...


class _Session(Protocol):
    """What a plan uses of `harness.session.Session`, when it is given one."""

    @property
    def id(self) -> str: ...

    @property
    def bindspace(self) -> Path: ...

    def update_record(self, **changes: Any) -> None: ...


@dataclass(frozen=True)
class Namespaces:
    """The namespaces a wrapped command runs in, as the wrapper reported them.

    Ids read like ``'net:[4026532178]'``: equal ids, same namespace.
    *init_pid* is the host pid of the pid namespace's init (`harness.nsinit`),
    which holds the namespace until `IsolationPlan.teardown`.
    """

    wrapper_pid: int
    netns: str
    pidns: str | None = None
    userns: str | None = None
    init_pid: int | None = None
    init_start_time: int | None = None


@dataclass(frozen=True)
class EndedProcess:
    """A process that ended with its pid namespace, as it was just before."""

    pid: int
    ns_pid: int | None
    ppid: int | None
    name: str
    cmdline: tuple[str, ...]

    def __str__(self) -> str:
        command = " ".join(self.cmdline) or f"[{self.name}]"
        inside = f" (pid {self.ns_pid} inside)" if self.ns_pid is not None else ""
        return f"pid {self.pid}{inside}: {command}"


class IsolationPlan:
    """How one session's command is isolated; use one plan per session.

    Build it with `plan`. The plan wraps the command (`wrap`), learns the
    namespaces once the command runs (`started`), answers the leak check
    (`processes`, `listeners`, `helper_pids`), and ends a pid namespace
    afterwards (`teardown`). A plan of level ``none`` does nothing at each
    step, so callers need no special case.
    """

    def __init__(
        self,
        level: str,
        *,
        userns: bool = False,
        python: str | None = None,
        requested: str | None = None,
    ) -> None:
        if level not in ("none", "net", "pid"):
            msg = f"an IsolationPlan level is 'none', 'net' or 'pid', not {level!r}"
            raise HarnessError(msg)
        self.level = level
        self.userns = userns
        self.python = python or sys.executable
        self.requested = requested or level
        self._state_dir: Path | None = None
        self._own_state_dir = False
        self._wrapper_pid: int | None = None
        self._namespaces: Namespaces | None = None
        self._torn_down = False

    def __repr__(self) -> str:
        return (
            f"IsolationPlan(level={self.level!r}, userns={self.userns!r}, "
            f"requested={self.requested!r})"
        )

    @property
    def levels(self) -> tuple[str, ...]:
        """The namespaces used: ``()``, ``('net',)`` or ``('net', 'pid')``."""
        return {"none": (), "net": ("net",), "pid": ("net", "pid")}[self.level]

    @property
    def namespaces(self) -> Namespaces | None:
        """What `started` learned; None before it, or at level ``none``."""
        return self._namespaces

    def describe(self) -> str:
        """One sentence on what this plan does, for logs and reports."""
        if self.level == "none":
            return (
                "no namespaces: the command shares the host's network and processes "
                "(cooperative isolation only: lease, bindspace, envelope)"
            )
        how = (
            " (created by an ordinary user through a user namespace that maps "
            "the user to itself)"
            if self.userns
            else ""
        )
        if self.level == "net":
            return (
                "a private network namespace with its own loopback, so "
                f"127.0.0.1:1616 is the session's own{how}"
            )
        return (
            "private network and pid namespaces: own loopback, own /proc, and "
            "harness nsinit as pid 1, so nothing the command starts outlives the "
            f"session{how}"
        )

    def wrap(
        self,
        argv: Sequence[str],
        session: _Session | None = None,
        *,
        state_dir: Path | None = None,
    ) -> list[str]:
        """Return the command line that runs *argv* isolated by this plan.

        At level ``none`` that is *argv* itself. Otherwise it runs
        `harness.nsinit` with this plan's Python, which enters the namespaces
        and then runs *argv* with the environment it was given, plus, when
        *session* is given, ``XDG_RUNTIME_DIR`` and ``XDG_CACHE_HOME`` in the
        session's bindspace (see `private_env`). The wrapper reports to
        *state_dir* (default: a new private folder under the harness's state
        dir, removed by `teardown`). Call it once per plan.
        """
        if not argv:
            msg = "cannot wrap an empty command: give the program to run"
            raise HarnessError(msg)
        if self.level == "none":
            return list(argv)
        if self._state_dir is not None:
            msg = (
                f"this IsolationPlan already wrapped a command (state in "
                f"{str(self._state_dir)!r}); make a new plan per session"
            )
            raise HarnessError(msg)
        if state_dir is None:
            parent = ensure_private_dir(harness_state_dir() / "isolate")
            self._state_dir = Path(tempfile.mkdtemp(prefix="ns-", dir=parent))
            self._own_state_dir = True
        else:
            self._state_dir = ensure_private_dir(Path(state_dir))
        options = ["--pid" if self.level == "pid" else "--net"]
        if self.userns:
            options.append("--userns")
        if session is not None:
            for name, value in private_env(session.bindspace, {}).items():
                options += ["--env", f"{name}={value}"]
        wrapped = [
            self.python,
            "-I",
            "-S",
            str(NSINIT_SCRIPT),
            *options,
            "--state",
            str(self._state_dir),
            "--",
            *argv,
        ]
        log.debug("Wrapped the command for %s: %s.", self.describe(), wrapped)
        return wrapped

    def started(
        self,
        proc: int | _HasPid,
        session: _Session | None = None,
        *,
        timeout: float = 30.0,
    ) -> Namespaces | None:
        """Wait until the wrapped command runs in its namespaces; return their ids.

        *proc* is the process started from `wrap`'s command line (a `Popen`,
        a `psutil.Process`, a trio process or a pid). Call it right after
        starting the process: it waits only for the wrapper to enter the
        namespaces (milliseconds), not for the command. It never reaps the
        process, so the caller's own ``wait()`` still gets the status. With
        *session*, the namespaces' ids go into its record (`record_fields`),
        where the leak check finds them.

        Raises `HarnessError` with the reason and the fix when the wrapper
        could not enter the namespaces, or ended without saying why.
        """
        if self.level == "none":
            return None
        if self._namespaces is not None:
            return self._namespaces
        if self._state_dir is None:
            msg = "IsolationPlan.started() needs the command from wrap() to run first"
            raise HarnessError(msg)
        pid = proc if isinstance(proc, int) else proc.pid
        self._wrapper_pid = pid
        ready = self._state_dir / "ready.json"
        error = self._state_dir / "error.json"
        log.debug("Waiting for process %s to enter its namespaces.", pid)
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while True:
            # The wrapper writes its file before the command can run, so once
            # it has ended, a missing file means it failed before writing.
            running = _running(pid)
            if ready.exists():
                data = json.loads(ready.read_text())
                self._namespaces = Namespaces(
                    wrapper_pid=data["wrapper_pid"],
                    netns=data["netns"],
                    pidns=data.get("pidns"),
                    userns=data.get("userns"),
                    init_pid=data.get("init_pid"),
                    init_start_time=data.get("init_start_time"),
                )
                log.debug("Process %s runs in %s.", pid, self._namespaces)
                if session is not None:
                    session.update_record(**self.record_fields())
                return self._namespaces
            if error.exists():
                raise HarnessError(self._refusal(json.loads(error.read_text())))
            if not running:
                msg = (
                    f"the isolation wrapper (pid {pid}) ended before entering its "
                    f"namespaces and left no report in {str(self._state_dir)!r}; "
                    "its stderr says why. Run `python -m harness.isolate` to check "
                    "what this host permits"
                )
                raise HarnessError(msg)
            if time.monotonic() > deadline:
                msg = (
                    f"the isolation wrapper (pid {pid}) has not entered its "
                    f"namespaces after {timeout:g} s; the machine may be overloaded. "
                    "Retry, or use `--isolate none`"
                )
                raise HarnessError(msg)
            # Entering takes tens of milliseconds: poll finely (one stat()
            # per check) so that start-up is not rounded up by the sleep.
            time.sleep(delay)
            delay = min(delay * 2, 0.002)

    def _refusal(self, report: Mapping[str, Any]) -> str:
        detail = report.get("message", "no detail")
        code = report.get("errno")
        if code == 28:  # ENOSPC
            fix = (
                "the limit on user namespaces is reached or zero "
                "(user.max_user_namespaces); raise it with `sudo sysctl -w "
                "user.max_user_namespaces=15000`"
            )
        elif code in (1, 13):  # EPERM, EACCES
            fix = (
                "this user may not create namespaces here; `python -m "
                "harness.isolate` shows which setting forbids it and how to "
                "change it"
            )
        else:
            fix = "`python -m harness.isolate` shows what this host permits"
        return (
            f"cannot run the session in {_LEVEL_WORDS[self.level]} "
            f"(--isolate {self.requested}): {detail}. Fix: {fix}. {_OTHER_CHOICES}"
        )

    def helper_pids(self) -> frozenset[int]:
        """Pids of the harness's own processes inside the namespaces.

        The pid namespace's init carries the session's envelope like every
        other process of the session, but it is the harness's, not a leak:
        leave it out of leak reports (teardown ends it).
        """
        if self._namespaces is None or self._namespaces.init_pid is None:
            return frozenset()
        return frozenset({self._namespaces.init_pid})

    def processes(self) -> list[int]:
        """Host pids of the processes in the session's namespace, helpers excluded.

        The pid namespace at level ``pid``, else the network namespace. Empty
        at level ``none`` or before `started`.
        """
        ns = self._namespaces
        if ns is None:
            return []
        ns_id = ns.pidns or ns.netns
        helpers = self.helper_pids()
        return [pid for pid in processes_in_namespace(ns_id) if pid not in helpers]

    def listeners(self) -> list[Listener]:
        """TCP listeners inside the session's network namespace.

        Read through a process that is in it (the init at level ``pid``),
        because the host's ``/proc/net/tcp`` does not show them. Empty when no
        process is left in the namespace, which then has no sockets either.
        """
        ns = self._namespaces
        if ns is None:
            return []
        for pid in [*self.helper_pids(), *processes_in_namespace(ns.netns)]:
            if nsinit.namespace_id(pid, "net") == ns.netns:
                with contextlib.suppress(OSError):
                    return tcp_listeners_in(pid)
        return []

    def record_fields(self) -> dict[str, Any]:
        """The `SessionRecord` fields this plan fills: isolate, netns, pidns."""
        ns = self._namespaces
        return {
            "isolate": list(self.levels),
            "netns": ns.netns if ns else None,
            "pidns": ns.pidns if ns else None,
        }

    def teardown(
        self, session: _Session | None = None, *, timeout: float = 10.0
    ) -> list[EndedProcess]:
        """End the session's namespaces; return the processes that ended with them.

        Call it after the leak check. At level ``pid`` it kills the
        namespace's init, and the kernel kills every process left in the
        namespace: the returned list says what they were. Before signalling it
        checks that the init is still the process that reported itself (same
        pid namespace, same start time), so a reused pid is never killed. At
        level ``net`` nothing is killed: a network namespace ends with its
        last process, and processes left in it are leaks for the leak check
        and reap. Removes the wrapper's state folder. Safe to call twice.
        *session* only names the session in the log line.
        """
        if self._torn_down:
            return []
        self._torn_down = True
        ended: list[EndedProcess] = []
        ns = self._namespaces
        if ns is None and self._state_dir is not None:
            # teardown() without started(): the wrapper may still have run.
            with contextlib.suppress(HarnessError):
                if (
                    self._wrapper_pid is not None
                    or (self._state_dir / "ready.json").exists()
                ):
                    ns = self.started(self._wrapper_pid or -1, timeout=0)
        if ns is not None and ns.pidns is not None and ns.init_pid is not None:
            where = f"session {session.id}" if session is not None else "the session"
            ended = _end_pid_namespace(ns, timeout=timeout, where=where)
        self._remove_state()
        return ended

    def _remove_state(self) -> None:
        if self._state_dir is None:
            return
        if self._own_state_dir:
            shutil.rmtree(self._state_dir, ignore_errors=True)
        else:
            for name in ("ready.json", "error.json"):
                with contextlib.suppress(FileNotFoundError):
                    (self._state_dir / name).unlink()


def _end_pid_namespace(
    ns: Namespaces, *, timeout: float, where: str
) -> list[EndedProcess]:
    assert ns.pidns is not None
    assert ns.init_pid is not None
    init = ns.init_pid
    if (
        nsinit.namespace_id(init, "pid") != ns.pidns
        or nsinit.start_time(init) != ns.init_start_time
    ):
        log.debug("The init of %s (pid %s) has already ended.", ns.pidns, init)
        return []

    # Describe the members first: once the init dies they are gone.
    members = [pid for pid in processes_in_namespace(ns.pidns) if pid != init]
    ended = [p for p in (_describe(pid) for pid in members) if p is not None]
    log.debug("Ending %s: killing its init, pid %s.", ns.pidns, init)
    with contextlib.suppress(ProcessLookupError):
        os.kill(init, signal.SIGKILL)

    deadline = time.monotonic() + timeout
    delay = 0.001
    while survivors := processes_in_namespace(ns.pidns):
        if time.monotonic() > deadline:
            log.warning(
                "The pid namespace %s still holds processes %s %g s after its "
                "init was killed; they are stuck in the kernel (state D).",
                ns.pidns,
                survivors,
                timeout,
            )
            break
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    if ended:
        log.info(
            "Ended the pid namespace %s of %s; %d process(es) ended with it: %s.",
            ns.pidns,
            where,
            len(ended),
            "; ".join(str(p) for p in ended),
        )
    else:
        log.debug("Ended the pid namespace %s; nothing else was in it.", ns.pidns)
    return ended


def _describe(pid: int) -> EndedProcess | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    ns_pids = fields.get("NSpid", "").split()
    return EndedProcess(
        pid=pid,
        ns_pid=int(ns_pids[-1]) if len(ns_pids) > 1 else None,
        ppid=int(fields["PPid"]) if "PPid" in fields else None,
        name=fields.get("Name", "?").strip(),
        cmdline=tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a),
    )


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def plan(
    requested: str | Sequence[str],
    *,
    capabilities: Capabilities | None = None,
    python: str | None = None,
) -> IsolationPlan:
    """Turn the requested isolation (``--isolate``) into a plan for one session.

    *requested* is one level or several (``"net"``, ``["net", "pid"]``,
    ``"net,pid"``); ``pid`` includes ``net``. ``auto`` takes the strongest
    level *capabilities* (default: `detect`) permit and logs the choice at
    INFO. Raises `HarnessError` for an unknown level, and, for ``net`` or
    ``pid``, when this host does not permit it: the message says why and
    what to do. Only ``auto`` falls back.
    """
    level = _normalise(requested)
    if level == "none":
        return IsolationPlan("none", requested="none")
    caps = capabilities if capabilities is not None else detect(python=python)
    if level == "auto":
        chosen = caps.best()
        if chosen == "none":
            log.info(
                "Isolation 'auto' chose none (cooperative isolation only): %s.",
                caps.why_not("net"),
            )
        else:
            log.info(
                "Isolation 'auto' chose %s: %s, as %s.",
                chosen,
                _LEVEL_WORDS[chosen],
                "root" if caps.privileged else "an ordinary user in a user namespace",
            )
        return IsolationPlan(
            chosen, userns=not caps.privileged, python=python, requested="auto"
        )
    if level not in caps.levels:
        msg = (
            f"cannot run the session in {_LEVEL_WORDS[level]} (--isolate {level}): "
            f"{caps.why_not(level)}. {_OTHER_CHOICES}"
        )
        raise HarnessError(msg)
    return IsolationPlan(
        level, userns=not caps.privileged, python=python, requested=level
    )


def _normalise(requested: str | Sequence[str]) -> str:
    items = [requested] if isinstance(requested, str) else list(requested)
    words = [w.strip() for item in items for w in item.split(",") if w.strip()]
    for word in words:
        if word not in ISOLATION_LEVELS:
            msg = (
                f"unknown isolation level {word!r}: choose from "
                f"{', '.join(ISOLATION_LEVELS)}"
            )
            raise HarnessError(msg)
    chosen = set(words) or {"none"}
    for alone in ("none", "auto"):
        if alone in chosen and len(chosen) > 1:
            msg = (
                f"isolation level {alone!r} cannot be combined with others "
                f"(got {words!r}); give {alone!r} alone, or net / pid"
            )
            raise HarnessError(msg)
    if chosen <= {"none"}:
        return "none"
    if "auto" in chosen:
        return "auto"
    return "pid" if "pid" in chosen else "net"


# ---------------------------------------------------------- the environment


def private_env(
    bindspace: Path | str, env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """A copy of *env* whose XDG runtime and cache dirs are in *bindspace*.

    A target that derives fixed socket names from ``$XDG_RUNTIME_DIR`` (as
    tractor does, through `platformdirs`) then puts them in the session's
    private folder, and cache files (tractor's hang dumps) land beside them
    on a short path. ``XDG_CACHE_HOME`` becomes ``<bindspace>/cache``, created
    ``0700``. *env* defaults to this process's environment and is not
    changed. Raises `HarnessError` when *bindspace* is not an absolute path.
    """
    path = Path(bindspace)
    if not path.is_absolute():
        msg = f"the bindspace must be an absolute path, got {str(bindspace)!r}"
        raise HarnessError(msg)
    result = dict(os.environ if env is None else env)
    result["XDG_RUNTIME_DIR"] = str(path)
    result["XDG_CACHE_HOME"] = str(ensure_private_dir(path / "cache"))
    return result


# -------------------------------------------------- inspection for leak checks


class Listener(NamedTuple):
    """A listening TCP socket: address, port and the socket's inode.

    The inode matches the ``socket:[inode]`` link in ``/proc/<pid>/fd`` of
    the process that holds it.
    """

    addr: str
    port: int
    inode: int


def processes_in_namespace(ns_id: str, *, proc_root: Path | str = "/proc") -> list[int]:
    """Host pids of the live processes in the namespace *ns_id*, sorted.

    *ns_id* is what ``/proc/<pid>/ns/<kind>`` links to, e.g.
    ``'net:[4026532178]'`` or ``'pid:[4026532180]'``; the kind is read from
    it. Processes this user may not inspect, and zombies, are not listed.
    """
    kind = ns_id.split(":", 1)[0]
    if kind not in ("net", "pid", "mnt", "user", "uts", "ipc", "cgroup", "time"):
        msg = f"not a namespace id: {ns_id!r}; expected e.g. 'net:[4026532178]'"
        raise HarnessError(msg)
    found = []
    with os.scandir(proc_root) as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                if os.readlink(f"{entry.path}/ns/{kind}") != ns_id:
                    continue
            except OSError:
                continue
            # A zombie still shows its pid namespace but holds nothing; its
            # parent (often the host's init) reaps it in its own time.
            if _running(int(entry.name)):
                found.append(int(entry.name))
    return sorted(found)


_TCP_LISTEN: Final = "0A"


def tcp_listeners_in(pid: int) -> list[Listener]:
    """The TCP listeners (IPv4 and IPv6) of the network namespace *pid* is in.

    Reads ``/proc/<pid>/net/tcp`` and ``tcp6``, which show the namespace of
    *pid*, not the host's. Raises `OSError` (``FileNotFoundError``) when the
    process is gone.
    """
    listeners: list[Listener] = []
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except FileNotFoundError:
            if name == "tcp6" and Path(f"/proc/{pid}").exists():
                continue  # IPv6 disabled in this kernel
            raise
        for line in lines:
            parts = line.split()
            if len(parts) < 10 or parts[3] != _TCP_LISTEN:
                continue
            addr_hex, port_hex = parts[1].split(":")
            listeners.append(
                Listener(
                    _decode_addr(addr_hex, family), int(port_hex, 16), int(parts[9])
                )
            )
    return listeners


def _decode_addr(text: str, family: int) -> str:
    # The kernel prints each 32-bit word of the address in host byte order.
    raw = bytes.fromhex(text)
    words = b"".join(
        int.from_bytes(raw[i : i + 4], sys.byteorder).to_bytes(4, "big")
        for i in range(0, len(raw), 4)
    )
    return socket.inet_ntop(family, words)


def main() -> int:
    """``python -m harness.isolate``: print what this host permits, and why."""
    caps = detect()
    print(caps.render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
