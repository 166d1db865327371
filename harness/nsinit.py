"""The first process of an isolated session: enter namespaces, run the command.

The harness does not import this module to run it: `harness.isolate` starts it
as a script, ``python -I -S nsinit.py OPTIONS -- COMMAND...``, so it must stay
standard-library only and quick to start (no ``harness`` imports, no
``argparse``). `harness.isolate` imports its small helpers (`unshare`,
`namespace_id`, ...) so that both sides agree on them.

Options (an internal protocol between this file and `harness.isolate`):

``--net``
    Enter a new network namespace and bring its loopback up, so that
    ``127.0.0.1:1616`` of one session is not that of another.
``--pid``
    Also enter a new pid namespace and a new mount namespace with its own
    ``/proc``. This process forks the namespace's init (pid 1), which starts
    the command, reaps every orphan, and stays alive after the command ends,
    holding the namespace until the harness kills it (`IsolationPlan.teardown`)
    or the process that started this wrapper exits.
``--userns``
    Create a user namespace first, mapping the caller's uid and gid to
    themselves; how an ordinary user gets the rights for the above.
``--env NAME=VALUE``
    Set an environment variable for the command (repeatable): how a plan
    gives the command a private ``XDG_CACHE_HOME`` when the runner controls
    the environment.
``--state DIR``
    Write ``ready.json`` (the namespaces' ids and the init's host pid) or
    ``error.json`` (why the namespaces could not be entered) into *DIR*.

Exit status: with ``--net`` alone this process becomes the command (``exec``),
so the status is the command's own. With ``--pid`` it waits for the command
and ends the same way: the same exit code, or killed by the same signal. When
the namespaces cannot be entered it exits with `EXIT_SETUP_FAILED` after
writing ``error.json`` and a message on stderr.
"""

# Start-up time is paid by every isolated session, so this script imports
# only what it needs, late where it can: `typing` (10 ms), `socket` (12 ms),
# `signal` (13 ms, for its enums), `json` and `contextlib` (5 ms each) stay
# off the common path; hence the C modules `_socket` and `_signal`, and
# try/except where `contextlib.suppress` would read better.
# ruff: noqa: SIM105

from __future__ import annotations

import _socket
import errno
import fcntl
import os
import struct
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from collections.abc import Sequence
    from typing import Any, NoReturn
else:
    import _signal as signal

#: The harness's own "could not do its job" status (`exit_codes.HARNESS_ERROR`);
#: repeated here because this script may import nothing from the package.
EXIT_SETUP_FAILED = 85

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
#: ``struct ifreq``: a 16-byte interface name, then a union whose first member
#: is the ``short`` flags; 40 bytes in all on 64- and 32-bit Linux.
_IFREQ = struct.Struct("16sH22x")

#: Signals the pid-level wrapper passes on to the command, as the harness's
#: runner does to the wrapper.
FORWARDED_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)

#: Signals a terminal sends to its whole foreground process group. One the
#: kernel generated is not forwarded to a command in the wrapper's process
#: group: it got its own copy, and a second Ctrl-C makes pytest abort at once.
TERMINAL_SIGNALS = (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)

#: ``si_code`` of a signal the kernel generated (a terminal's Ctrl-C).
_SI_KERNEL = 0x80

WRAPPER_NAME = b"harness-nswrap"
INIT_NAME = b"harness-nsinit"


# ------------------------------------------------------------ system calls


def unshare(flags: int) -> None:
    """Move this process into new namespaces (``unshare(2)``).

    Uses `os.unshare` where Python has it (3.12+), else calls libc through
    `ctypes`. Raises `OSError` with the kernel's errno.
    """
    if hasattr(os, "unshare"):
        os.unshare(flags)
        return
    libc = _libc()
    if libc.unshare(flags) != 0:
        code = _ctypes_errno()
        raise OSError(code, os.strerror(code))


def mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    """``mount(2)`` through libc; raises `OSError` with the kernel's errno."""
    import ctypes

    libc = _libc()
    libc.mount.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_void_p,
    ]
    encoded = [None if s is None else s.encode() for s in (source, target, fstype)]
    if libc.mount(encoded[0], encoded[1], encoded[2], flags, None) != 0:
        code = _ctypes_errno()
        raise OSError(code, f"{os.strerror(code)} (mount {fstype} on {target})")


def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _ctypes_errno() -> int:
    import ctypes

    return ctypes.get_errno()


def namespace_id(pid: int | str = "self", kind: str = "net") -> str | None:
    """The id of *pid*'s namespace of *kind*, e.g. ``'net:[4026532178]'``.

    Two processes are in the same namespace exactly when the ids are equal.
    Returns None when the process is gone, is a zombie, or may not be read.
    """
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


def start_time(pid: int | str = "self") -> int | None:
    """*pid*'s start time in clock ticks since boot (``/proc/<pid>/stat``).

    With the pid it identifies one process for good: a reused pid has a
    later start time. None when the process is gone.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[19])


def map_own_ids(uid: int, gid: int) -> None:
    """Map *uid* and *gid* to themselves in the user namespace just created.

    Identity mapping keeps the command's uid what it was (files it creates,
    ``getuid()``, ``/run/user/<uid>``), unlike ``unshare --map-root-user``.
    ``setgroups`` must be denied before an unprivileged process may write the
    gid map.
    """
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1\n")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1\n")


def loopback_up(name: str = "lo") -> None:
    """Bring the interface *name* up with ``SIOCSIFFLAGS``, without iproute2.

    A new network namespace has only a loopback interface, and it is down:
    nothing can bind ``127.0.0.1`` until it is up.
    """
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        request = _IFREQ.pack(name.encode(), 0)
        _, flags = _IFREQ.unpack(fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, request))
        if not flags & _IFF_UP:
            fcntl.ioctl(
                sock.fileno(),
                _SIOCSIFFLAGS,
                _IFREQ.pack(name.encode(), flags | _IFF_UP),
            )
    finally:
        sock.close()


def _set_name(name: bytes) -> None:
    # What `ps` and the leak report show for this process instead of
    # "python": the kernel keeps 15 bytes of it.
    try:
        with open("/proc/self/comm", "wb") as comm:
            comm.write(name[:15])
    except OSError:
        pass


# ----------------------------------------------------------------- options


class Options:
    """The parsed command line of this script."""

    def __init__(self) -> None:
        self.net = False
        self.pid = False
        self.userns = False
        self.state: str | None = None
        self.probe = False
        self.env: list[tuple[str, str]] = []
        self.command: list[str] = []


def parse(argv: Sequence[str]) -> Options:
    """Parse this script's options; exits with status 2 on a bad one."""
    options = Options()
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            options.command = args
            break
        if arg == "--net":
            options.net = True
        elif arg == "--pid":
            options.pid = options.net = True
        elif arg == "--userns":
            options.userns = True
        elif arg == "--probe":
            options.probe = True
        elif arg == "--state" and args:
            options.state = args.pop(0)
        elif arg == "--env" and args and "=" in args[0]:
            name, _, value = args.pop(0).partition("=")
            options.env.append((name, value))
        else:
            _usage(f"unknown option {arg!r}")
    if not options.probe and not options.command:
        _usage("no command given after '--'")
    return options


def _usage(problem: str) -> NoReturn:
    sys.stderr.write(
        f"harness nsinit: {problem}\n"
        "usage: nsinit.py [--net] [--pid] [--userns] [--state DIR] "
        "[--env NAME=VALUE]... -- COMMAND...\n"
        "(run by harness.isolate, not by hand)\n"
    )
    sys.exit(2)


# -------------------------------------------------------------- state files


def _write_state(state_dir: str | None, name: str, text: str) -> None:
    if state_dir is None:
        return
    # Written whole and renamed, so the harness never reads half a file.
    final = os.path.join(state_dir, name)
    temporary = f"{final}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        f.write(text)
    os.replace(temporary, final)


def _ready_json(**fields: int | str | None) -> str:
    """The ready report as JSON, without importing `json` (5 ms).

    Its values are pids, clock ticks and namespace ids, which the kernel
    formats as ``kind:[digits]``: nothing in them needs escaping.
    """
    parts = []
    for key, value in fields.items():
        if value is None:
            shown = "null"
        elif isinstance(value, int):
            shown = str(value)
        else:
            shown = f'"{value}"'
        parts.append(f'"{key}": {shown}')
    return "{" + ", ".join(parts) + "}"


def _fail(options: Options, step: str, exc: OSError | str) -> NoReturn:
    if isinstance(exc, OSError):
        code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        detail = f"{exc.strerror or exc} ({code})"
        errno_value: int | None = exc.errno
    else:
        detail, errno_value = exc, None
    message = f"cannot {step}: {detail}"
    sys.stderr.write(f"harness nsinit: {message}\n")
    sys.stderr.flush()
    import json

    report = {"step": step, "detail": detail, "errno": errno_value, "message": message}
    try:
        _write_state(options.state, "error.json", json.dumps(report))
    except OSError:
        pass
    os._exit(EXIT_SETUP_FAILED)


# ------------------------------------------------------------- namespaces


def enter(options: Options) -> None:
    """Create and enter the namespaces *options* ask for; bring loopback up.

    Raises `OSError` naming nothing; the caller says which step failed.
    """
    uid, gid = os.getuid(), os.getgid()
    # The mount namespace for the new /proc is the init's alone (see
    # `mount_private_proc`): this wrapper keeps the host's /proc, through
    # which it reports the init's host pid and the namespaces' ids.
    flags = CLONE_NEWNET
    if options.pid:
        flags |= CLONE_NEWPID
    if options.userns:
        flags |= CLONE_NEWUSER
    try:
        unshare(flags)
    except OSError as exc:
        _fail(options, f"unshare({_flag_names(flags)})", exc)
    if options.userns:
        try:
            map_own_ids(uid, gid)
        except OSError as exc:
            _fail(options, "map the uid and gid into the user namespace", exc)
    try:
        loopback_up()
    except OSError as exc:
        _fail(options, "bring the loopback interface up in the network namespace", exc)


def _flag_names(flags: int) -> str:
    names = [
        name
        for name, bit in (
            ("CLONE_NEWUSER", CLONE_NEWUSER),
            ("CLONE_NEWNET", CLONE_NEWNET),
            ("CLONE_NEWPID", CLONE_NEWPID),
            ("CLONE_NEWNS", CLONE_NEWNS),
        )
        if flags & bit
    ]
    return "|".join(names)


def mount_private_proc() -> None:
    """Enter a new mount namespace with its own ``/proc`` for the pid namespace.

    Called by the init, whose pid namespace the new ``/proc`` shows. Mounts
    are first made private, recursively: on a host whose ``/`` is a shared
    mount (systemd's default) the new ``/proc`` would otherwise propagate back
    and replace the host's view of its processes.
    """
    unshare(CLONE_NEWNS)
    mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)


def _restore_signals() -> None:
    # Python ignores SIGPIPE and SIGXFSZ at start-up, and the init ignores
    # the forwarded signals; ignored signals and the blocked mask survive
    # exec, so give the command the defaults a shell would.
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, *FORWARDED_SIGNALS):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def _exec(command: Sequence[str]) -> NoReturn:
    try:
        os.execvp(command[0], list(command))
    except OSError as exc:
        status = 127 if exc.errno == errno.ENOENT else 126
        sys.stderr.write(f"harness nsinit: cannot run {command[0]!r}: {exc.strerror}\n")
        sys.stderr.flush()
        os._exit(status)


# ---------------------------------------------------------------- the init


def run_init(command: Sequence[str], report: int, lifeline: int | None) -> NoReturn:
    """Be pid 1 of the new pid namespace: start *command*, reap, hold on.

    Reports on the pipe *report*: ``started``, then ``exit <wait status>``
    when the command ends (or ``error <json>`` when ``/proc`` cannot be
    mounted). Then it keeps reaping orphans, holding the namespace open for
    the harness's leak check, until it is killed, or until *lifeline* (a
    pidfd of the process that started the wrapper) says that process ended:
    a namespace must not outlive its session.
    """
    _set_name(INIT_NAME)
    # The wrapper forwards signals to the command itself. The init ignores
    # them: signals from outside reach a pid 1 only if it handles them, and
    # Python's own SIGINT handler would otherwise turn a terminal's Ctrl-C
    # into the end of the whole namespace.
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    try:
        mount_private_proc()
    except OSError as exc:
        import json

        _send(
            report, "error " + json.dumps({"step": "mount /proc", "detail": str(exc)})
        )
        os._exit(EXIT_SETUP_FAILED)

    # SIGCHLD needs a Python handler for the wakeup fd to be written.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    # The wrapper blocked signals before forking this init; with handlers in
    # place they may come now.
    signal.pthread_sigmask(signal.SIG_SETMASK, set())

    child: int | None = os.fork()
    if child == 0:
        signal.set_wakeup_fd(-1)
        _restore_signals()
        _exec(command)
    _send(report, "started")

    # The init keeps no stream of the session open: a runner that reads the
    # command's output to its end must see the end when the command is done.
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)

    import select

    poller = select.poll()
    poller.register(wake_r, select.POLLIN)
    if lifeline is not None:
        poller.register(lifeline, select.POLLIN)
    while True:
        child = _reap(child, report)
        for fd, _ in poller.poll():
            if fd == lifeline:
                os._exit(0)
            try:
                os.read(wake_r, 512)
            except (BlockingIOError, InterruptedError):
                pass


def _reap(child: int | None, report: int) -> int | None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return child
        if pid == 0:
            return child
        if pid == child:
            _send(report, f"exit {status}")
            child = None


def _send(fd: int, line: str) -> None:
    try:
        os.write(fd, line.encode() + b"\n")
    except OSError:
        pass


# ------------------------------------------------------------- the wrapper


def run_pid_namespace(options: Options) -> NoReturn:
    """Fork the namespace's init, publish its ids, forward signals, wait.

    One loop waits for both the init's reports and signals: the report pipe
    raises SIGIO when written to, and `sigtimedwait` returns each signal with
    its origin, so a terminal's Ctrl-C can be told from a forwarded one.
    """
    _set_name(WRAPPER_NAME)
    lifeline: int | None
    try:
        lifeline = os.pidfd_open(os.getppid())
    except (AttributeError, OSError):
        # Kernels before 5.3 have no pidfd: then only the harness's teardown
        # (or a reap) ends the namespace.
        lifeline = None
    report_r, report_w = os.pipe()
    # Blocked before the fork, so that no signal ends this wrapper by its
    # default action before the loop below is waiting for it.
    waited = {*FORWARDED_SIGNALS, signal.SIGCHLD, signal.SIGIO}
    signal.pthread_sigmask(signal.SIG_BLOCK, waited)

    init = os.fork()
    if init == 0:
        os.close(report_r)
        run_init(options.command, report_w, lifeline)
    os.close(report_w)
    if lifeline is not None:
        os.close(lifeline)
    fcntl.fcntl(report_r, fcntl.F_SETOWN, os.getpid())
    flags = fcntl.fcntl(report_r, fcntl.F_GETFL)
    fcntl.fcntl(report_r, fcntl.F_SETFL, flags | os.O_ASYNC | os.O_NONBLOCK)

    command: _Command | None = None
    early: list[Any] = []
    pending = b""
    started = False
    while True:
        chunk, ended = _read_available(report_r)
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            text = line.decode()
            if text == "started":
                started = True
                command = _Command.find(init)
                _publish_ready(options, init)
                for info in early:
                    _forward(command, info)
            elif text.startswith("error "):
                import json

                failure = json.loads(text[6:])
                _fail(options, failure["step"], failure["detail"])
            elif text.startswith("exit "):
                _exit_like(int(text[5:]))
        if ended:
            if not started:
                _fail(options, "start the pid namespace's init", _init_death(init))
            sys.stderr.write(
                f"harness nsinit: the pid namespace ended before the command did "
                f"({_init_death(init)}); everything in it was killed\n"
            )
            sys.stderr.flush()
            os._exit(128 + signal.SIGKILL)
        info = signal.sigtimedwait(waited, 1.0)
        if info is None or info.si_signo not in FORWARDED_SIGNALS:
            continue
        if started:
            _forward(command, info)
        else:
            early.append(info)


def _read_available(fd: int) -> tuple[bytes, bool]:
    """What can be read from *fd* now, and whether its writer has closed it."""
    data = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return data, False
        if not chunk:
            return data, True
        data += chunk


def _publish_ready(options: Options, init: int) -> None:
    _write_state(
        options.state,
        "ready.json",
        _ready_json(
            wrapper_pid=os.getpid(),
            init_pid=init,
            init_start_time=start_time(init),
            netns=namespace_id("self", "net"),
            pidns=namespace_id("self", "pid_for_children"),
            userns=namespace_id("self", "user") if options.userns else None,
        ),
    )


class _Command:
    """The command inside the pid namespace, as seen from the host."""

    def __init__(self, pid: int, pidfd: int | None) -> None:
        self.pid = pid
        self.pidfd = pidfd

    @classmethod
    def find(cls, init: int) -> _Command | None:
        """The init's child that is pid 2 in the namespace: the command.

        Orphans re-parented to the init are its children too; only the
        command was forked first. A pidfd, where the kernel has them, keeps
        a later signal from reaching another process that reused the pid.
        """
        for pid in _children(init):
            try:
                with open(f"/proc/{pid}/status") as status:
                    for line in status:
                        if line.startswith("NSpid:"):
                            ns_pid = line.split()[-1]
                            break
                    else:
                        continue
            except OSError:
                continue
            if ns_pid != "2":
                continue
            try:
                pidfd: int | None = os.pidfd_open(pid)
            except (AttributeError, OSError):
                pidfd = None
            return cls(pid, pidfd)
        return None

    def send(self, sig: int) -> None:
        try:
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, sig)
            else:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            pass


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        pass
    # Kernels without CONFIG_PROC_CHILDREN: look for the parent pid instead.
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as stat:
                    if int(stat.read().rsplit(b")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


def _forward(command: _Command | None, info: Any) -> None:
    if command is None:
        return
    sig = info.si_signo
    if info.si_code == _SI_KERNEL and sig in TERMINAL_SIGNALS:
        try:
            if os.getpgid(command.pid) == os.getpgrp():
                return
        except ProcessLookupError:
            return
    command.send(sig)


def _init_death(init: int) -> str:
    try:
        _, status = os.waitpid(init, 0)
    except ChildProcessError:
        return "its init is gone"
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        from signal import Signals

        return f"its init was killed by {Signals(-code).name}"
    return f"its init exited with status {code}"


def _exit_like(status: int) -> NoReturn:
    """End this process the way the command ended: same code or signal."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        os._exit(code)
    sig = -code
    # Die of the same signal, so the harness sees what a direct child would
    # have shown, but without writing a core file of this wrapper.
    import resource

    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        signal.signal(sig, signal.SIG_DFL)
    except (OSError, ValueError):
        pass
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)


# ------------------------------------------------------------------ probe


def probe(options: Options) -> NoReturn:
    """Try each namespace level in a throwaway child; print JSON results.

    ``{"net": null, "pid": "EPERM: Operation not permitted (...)"}``: null
    means the level works here.
    """
    results: dict[str, str | None] = {}
    for level in ("net", "pid"):
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            os.close(r)
            os.dup2(w, 2)
            trial = Options()
            trial.net, trial.pid, trial.userns = True, level == "pid", options.userns
            enter(trial)
            if trial.pid:
                init = os.fork()
                if init == 0:
                    try:
                        mount_private_proc()
                    except OSError as exc:
                        _fail(trial, "mount /proc in the pid namespace", exc)
                    os._exit(0)
                _, status = os.waitpid(init, 0)
                os._exit(os.waitstatus_to_exitcode(status))
            os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as stream:
            message = stream.read().decode(errors="replace").strip()
        _, status = os.waitpid(child, 0)
        ok = os.waitstatus_to_exitcode(status) == 0
        results[level] = None if ok else message.removeprefix("harness nsinit: ")
    import json

    sys.stdout.write(json.dumps(results) + "\n")
    sys.stdout.flush()
    os._exit(0)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Enter the namespaces and run the command; see the module docstring."""
    options = parse(sys.argv[1:] if argv is None else argv)
    if options.probe:
        probe(options)
    for name, value in options.env:
        os.environ[name] = value
    enter(options)
    if options.pid:
        run_pid_namespace(options)
    _write_state(
        options.state,
        "ready.json",
        _ready_json(
            wrapper_pid=os.getpid(),
            init_pid=None,
            init_start_time=None,
            netns=namespace_id("self", "net"),
            pidns=None,
            userns=namespace_id("self", "user") if options.userns else None,
        ),
    )
    _restore_signals()
    _exec(options.command)


if __name__ == "__main__":
    main()
