"""The core of ``harness exec``: run one command inside a new session.

`run_command` opens a `Session`, starts the command with the session's
environment, forwards signals to it, reaps orphans it adopts, waits for it,
closes the session and returns a shell-style exit status: the command's own,
or ``128 + N`` when signal N killed it.

The owner of the session is the process calling `run_command` (the
``harness exec`` process). It marks itself a child subreaper on Linux, so a
process that double-forks away from the command is re-parented to it rather
than to init, and it waits for such orphans as they exit (see
`harness.subreaper`). When nox runs a session, the owner is that
``harness exec`` child of nox, not nox itself.

Signals. SIGTERM, SIGHUP and SIGINT sent to the owner are passed on to the
command (its direct child only; a command that wants its own children to
hear them forwards them itself, as pytest or a shell would). One exception
avoids a double delivery: Ctrl-C (and a hang-up) in a terminal is sent by
the kernel to the whole foreground process group, which already holds the
command, so a SIGINT or SIGHUP that the kernel generated is not forwarded
when the command is in the owner's process group. On Linux the source is
known exactly (``sigtimedwait`` gives ``si_code``); elsewhere a SIGINT is
forwarded only to a command in another process group. The owner itself never
dies of these signals: it waits for the command, like a shell for a
foreground job.

Seams. Other parts of the harness plug into a run through `RunHooks`, four
optional callables, wired in one place, `default_hooks`:

``command_wrapper(argv, session) -> argv``
    Called once, before the command starts; returns the argv to run
    instead (namespace isolation wraps the command in ``unshare ...``).
``spawn_options(session) -> dict``
    Called once, before the command starts; extra keyword arguments for
    `subprocess.Popen` (``stdout=subprocess.PIPE`` for a silence watchdog
    that reads the command's output, ``pass_fds=``, ...). ``env`` and
    ``args`` are the runner's and cannot be set here.
``watch(proc, session) -> stop | None``
    Called once, right after the command started, in the owner's main
    thread; it must return at once (start a thread or a timer for a hang
    watchdog) and may return a callable that is called, without
    arguments, when the command has exited. Threads it starts inherit the
    owner's blocked signals, so signals still reach the runner.
``after_exit(session, status) -> status``
    Called once the command exited, with the session still open: the leak
    check, reap and report go here. It returns the exit status to use
    (e.g. `exit_codes.LEAKED`) and may put its leak report on
    ``session.leaks``; `Session.close` then keeps the bindspace and the
    record when the report counts leaks. It reads the leak mode and report
    path from the `RunOptions` given to `default_hooks`.

Without an ``after_exit`` hook, `Session.close` counts the socket files left
in the bindspace; the runner then applies the leak mode to that count
(``fail``: a passing command exits `exit_codes.LEAKED`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Final, Literal

from harness import exit_codes
from harness.errors import HarnessError

if TYPE_CHECKING:
    from harness.session import Session

log = logging.getLogger("harness.runner")

LeakMode = Literal["fail", "warn", "reap"]
LEAK_MODES: Final = ("fail", "warn", "reap")

#: The signals passed on to the command.
FORWARDED: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

#: Signals a terminal sends to its whole foreground process group.
TERMINAL_SIGNALS: Final = frozenset({signal.SIGINT, signal.SIGHUP})

#: ``si_code`` of a signal the kernel generated (a terminal's Ctrl-C).
SI_KERNEL: Final = 0x80

#: Longest wait between checks of the command when no signal arrives; only
#: a safety net, exits are noticed through SIGCHLD at once.
POLL_INTERVAL: Final = 1.0

#: Seconds between SIGTERM and SIGKILL when the runner has to end the command.
STOP_GRACE: Final = 5.0

#: Shell statuses for a command that cannot be run.
NOT_FOUND: Final = 127
NOT_EXECUTABLE: Final = 126


class CommandNotRunnable(HarnessError):
    """The command is missing, not found or not executable.

    ``status`` is the exit status to use: 127 (not found) or 126 (not
    executable), as a shell would, or 2 (usage) when no command was given.
    """

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def default_leak_mode(env: Mapping[str, str] | None = None) -> LeakMode:
    """``fail`` when ``$CI`` is true (as CI services set it), else ``warn``."""
    value = (os.environ if env is None else env).get("CI", "")
    return "fail" if value.strip().lower() in ("true", "1", "yes") else "warn"


@dataclass(frozen=True)
class RunOptions:
    """What ``harness exec`` was asked for, besides the command."""

    name: str = "session"
    backend: str | None = None
    transport: str | None = None
    bindspace_folder: str = "tractor"
    leaks: LeakMode = "warn"
    report: Path | None = None
    rtvars: Mapping[str, Any] = field(default_factory=dict)
    runtime_dir: Path | None = None
    port_range: tuple[int, int] | None = None
    isolate: tuple[str, ...] = ()
    """Kernel namespaces to run the command in (``net``, ``pid``, ``auto``)."""


Wrapper = Callable[[list[str], "Session"], list[str]]
SpawnOptions = Callable[["Session"], Mapping[str, Any]]
Watcher = Callable[["subprocess.Popen[bytes]", "Session"], Callable[[], None] | None]
AfterExit = Callable[["Session", int], int]


@dataclass(frozen=True)
class RunHooks:
    """The seams of a run; see the module docstring for each one's contract."""

    command_wrapper: Wrapper | None = None
    spawn_options: SpawnOptions | None = None
    watch: Watcher | None = None
    after_exit: AfterExit | None = None


def default_hooks(options: RunOptions) -> RunHooks:
    """The hooks ``harness exec`` runs with for *options*.

    This is the one place where isolation, the hang watchdog and the leak
    check are plugged into a run; `harness.exec_hooks` builds them.
    """
    from harness.exec_hooks import build_hooks

    return build_hooks(options)


def resolve_command(argv: Sequence[str], env: Mapping[str, str]) -> str:
    """The executable *argv* names, searched on *env*'s ``PATH``.

    Raises `CommandNotRunnable` with a message that names the command and a
    shell's status: 127 (not found) or 126 (not executable); 2 (usage) when
    *argv* is empty.
    """
    if not argv:
        msg = "no command given; put it after `--`, e.g. `harness exec -- pytest tests`"
        raise CommandNotRunnable(msg, exit_codes.USAGE)
    name = argv[0]
    if "/" in name:
        if not os.path.exists(name):
            msg = f"command not found: {name!r} (no such file)"
            raise CommandNotRunnable(msg, NOT_FOUND)
        if os.path.isdir(name) or not os.access(name, os.X_OK):
            msg = f"command {name!r} is not executable; check its mode (chmod +x)"
            raise CommandNotRunnable(msg, NOT_EXECUTABLE)
        return name
    found = shutil.which(name, path=env.get("PATH", os.defpath))
    if found is None:
        msg = (
            f"command not found: {name!r} is not on PATH; check its spelling, "
            "or activate the environment that provides it"
        )
        raise CommandNotRunnable(msg, NOT_FOUND)
    return found


def shell_status(returncode: int) -> int:
    """A `subprocess` return code as a shell reports it: ``128 + N`` for signal N."""
    return 128 - returncode if returncode < 0 else returncode


def run_command(
    argv: Sequence[str],
    options: RunOptions | None = None,
    hooks: RunHooks | None = None,
) -> int:
    """Run *argv* in a new session; return its shell-style exit status.

    Raises `CommandNotRunnable` before any session exists when the command
    cannot be found, and `HarnessError` when the session cannot be opened.
    """
    from harness.session import Session

    options = options or RunOptions()
    hooks = hooks if hooks is not None else default_hooks(options)
    argv = list(argv)
    resolve_command(argv, os.environ)

    session = Session(
        options.name,
        backend=options.backend,
        transport=options.transport,
        command=argv,
        runtime_dir=options.runtime_dir,
        bindspace_folder=options.bindspace_folder,
        port_range=options.port_range,
        rtvars=options.rtvars,
        subreaper=True,
    )
    with session:
        final = list(argv)
        if hooks.command_wrapper is not None:
            final = hooks.command_wrapper(final, session)
        status = _run_child(final, session, hooks)
        session.exit_status = status
        if hooks.after_exit is not None:
            status = hooks.after_exit(session, status)
        # Orphans killed by the leak check's reap are our zombies now.
        _reap_all()
    if hooks.after_exit is None and session.leak_count:
        status = _apply_leak_mode(session, options, status)
    return status


def _apply_leak_mode(session: Session, options: RunOptions, status: int) -> int:
    # Session.close has logged what it kept and where; only the verdict is left.
    if options.leaks == "reap":
        log.warning(
            "Leak mode 'reap' needs an after_exit hook (see default_hooks); "
            "nothing was reaped in session %s.",
            session.id,
        )
    if options.leaks == "fail" and status == 0:
        return exit_codes.LEAKED
    return status


def _reap_all() -> None:
    from harness.subreaper import reap_adopted

    reap_adopted()


# ---------------------------------------------------------------- the child


def _run_child(argv: list[str], session: Session, hooks: RunHooks) -> int:
    """Start *argv* in *session*, forward signals, reap orphans, wait."""
    if hasattr(signal, "sigtimedwait"):
        return _run_child_sigwait(argv, session, hooks)
    return _run_child_handlers(argv, session, hooks)


def _spawn(
    argv: list[str], session: Session, hooks: RunHooks
) -> subprocess.Popen[bytes]:
    extra = dict(hooks.spawn_options(session)) if hooks.spawn_options else {}
    for reserved in ("args", "env"):
        if reserved in extra:
            msg = f"spawn_options may not set {reserved!r}; the runner owns it"
            raise HarnessError(msg)
    try:
        return subprocess.Popen(argv, env=session.env(), **extra)
    except FileNotFoundError:
        msg = f"command not found: {argv[0]!r}"
        raise CommandNotRunnable(msg, NOT_FOUND) from None
    except PermissionError:
        msg = f"command {argv[0]!r} is not executable; check its mode (chmod +x)"
        raise CommandNotRunnable(msg, NOT_EXECUTABLE) from None


def _forward(proc: subprocess.Popen[bytes], signum: int, from_kernel: bool) -> None:
    name = signal.Signals(signum).name
    if from_kernel and signum in TERMINAL_SIGNALS and _same_group(proc.pid):
        log.debug("%s came from the terminal; the command got it too.", name)
        return
    log.info("Forwarding %s to the command (pid %d).", name, proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signum)


def _same_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == os.getpgrp()
    except ProcessLookupError:
        return True


def _stop_child(proc: subprocess.Popen[bytes]) -> None:
    """End the command because the runner itself failed (a hook raised).

    SIGTERM first, SIGKILL after `STOP_GRACE` seconds; both are logged, so
    an escalation is never silent.
    """
    if proc.poll() is not None:
        return
    log.warning(
        "The runner failed while the command (pid %d) ran; terminating it.",
        proc.pid,
    )
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout=STOP_GRACE)
    except subprocess.TimeoutExpired:
        log.warning(
            "The command (pid %d) ignored SIGTERM for %.0f s; killing it.",
            proc.pid,
            STOP_GRACE,
        )
        proc.kill()
        proc.wait()


def _run_child_sigwait(argv: list[str], session: Session, hooks: RunHooks) -> int:
    from harness.subreaper import reap_adopted

    # Signals that arrive before the mask is in place are noted, then
    # forwarded once the command exists.
    early: list[int] = []

    def note(signum: int, frame: FrameType | None) -> None:
        early.append(signum)

    waited = {*FORWARDED, signal.SIGCHLD}
    previous = {sig: signal.signal(sig, note) for sig in FORWARDED}
    try:
        proc = _spawn(argv, session, hooks)
        # Block only after the spawn: a blocked mask would be inherited by
        # the command, which then could not be interrupted at all.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, waited)
        try:
            for signum in early:
                _forward(proc, signum, from_kernel=False)
            stop = hooks.watch(proc, session) if hooks.watch is not None else None
            exclude = {proc.pid}
            try:
                while True:
                    reap_adopted(exclude)
                    if proc.poll() is not None:
                        break
                    info = signal.sigtimedwait(waited, POLL_INTERVAL)
                    if info is not None and info.si_signo != signal.SIGCHLD:
                        _forward(proc, info.si_signo, info.si_code == SI_KERNEL)
            finally:
                if stop is not None:
                    stop()
            # The command is gone: what is still pending is for nobody.
            while signal.sigtimedwait(waited, 0) is not None:
                pass
        except BaseException:
            _stop_child(proc)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    reap_adopted()
    return shell_status(proc.returncode)


def _run_child_handlers(argv: list[str], session: Session, hooks: RunHooks) -> int:
    from harness.subreaper import reap_adopted

    holder: list[subprocess.Popen[bytes]] = []
    early: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        if not holder:
            early.append(signum)
            return
        # Without siginfo a terminal's Ctrl-C cannot be told from a kill;
        # a command in our process group got the terminal's copy already.
        _forward(holder[0], signum, from_kernel=signum == signal.SIGINT)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        proc = _spawn(argv, session, hooks)
        holder.append(proc)
        for signum in early:
            _forward(proc, signum, from_kernel=False)
        try:
            stop = hooks.watch(proc, session) if hooks.watch is not None else None
            try:
                exclude = {proc.pid}
                while True:
                    try:
                        proc.wait(timeout=0.2)
                        break
                    except subprocess.TimeoutExpired:
                        reap_adopted(exclude)
            finally:
                if stop is not None:
                    stop()
        except BaseException:
            _stop_child(proc)
            raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    reap_adopted()
    return shell_status(proc.returncode)
