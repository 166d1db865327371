"""Let a process dump its Python stacks into the bindspace on a signal.

One line in a script, or in a conftest, makes a process capturable by
``harness dump`` and by the hang watchdog even where ``py-spy`` cannot attach
(no ptrace permission, no ``py-spy`` installed)::

    from harness.faulthandler_hook import enable; enable()

`enable` registers `faulthandler` for the envelope's ``diag_signal`` (default
``SIGUSR2``; tractor keeps ``SIGUSR1`` for its own task-tree dumps) so that the
signal writes every thread's stack to ``<bindspace>/stacks/<pid>.txt``. The
dump is written from the C signal handler, so it works while the main thread
is blocked in a lock, a ``sleep`` or a socket call.

A process that forks after `enable` (``multiprocessing``'s ``fork`` and
``forkserver`` children, double-forked daemons) re-registers in the child, so
each process writes its own file. A process started with ``exec`` (a
``spawn`` child, ``trio.run_process``) starts without the handler and has to
call `enable` itself.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from harness.errors import HarnessError
from harness.rtvars import RuntimeVars, load_rtvars

log = logging.getLogger("harness.faulthandler_hook")

#: The signal used when the envelope names none. Not ``SIGUSR1``: tractor's
#: stackscope handler owns that one.
DEFAULT_SIGNAL: Final = signal.SIGUSR2

#: The folder inside the bindspace that holds one stacks file per process.
STACKS_DIRNAME: Final = "stacks"

#: Signals that `faulthandler` cannot register: uncatchable ones, and the
#: fatal ones it handles through `faulthandler.enable` instead.
_REFUSED: Final = frozenset(
    {
        signal.SIGKILL,
        signal.SIGSTOP,
        signal.SIGSEGV,
        signal.SIGFPE,
        signal.SIGABRT,
        signal.SIGBUS,
        signal.SIGILL,
    }
)


@dataclass(frozen=True)
class _Registration:
    sig: signal.Signals
    bindspace: Path
    fd: int
    chain: bool


# What this process registered. Kept so that a forked child can re-register
# with a file of its own, and so that calling `enable` twice replaces the
# file instead of leaking descriptors.
_registration: _Registration | None = None
_fork_hook_installed = False


def resolve_signal(value: str | int | None) -> signal.Signals:
    """The signal named by *value* (``"SIGUSR2"``, ``"usr2"``, ``12``).

    ``None`` or an empty string gives `DEFAULT_SIGNAL`. Raises `HarnessError`
    for an unknown name or a signal `faulthandler` cannot register.
    """
    if value is None or value == "":
        return DEFAULT_SIGNAL
    try:
        if isinstance(value, int) or value.strip().isdigit():
            sig = signal.Signals(int(value))
        else:
            name = value.strip().upper()
            sig = signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
    except (KeyError, ValueError):
        msg = (
            f"diag_signal {value!r} is not a signal name; use e.g. 'SIGUSR2' "
            "(the default) or another signal a process may catch"
        )
        raise HarnessError(msg) from None
    if sig in _REFUSED:
        msg = (
            f"diag_signal {value!r} ({sig.name}) cannot carry stack dumps: it is "
            "uncatchable or reserved for crashes; use 'SIGUSR2' (the default)"
        )
        raise HarnessError(msg)
    return sig


def stacks_file(bindspace: str | os.PathLike[str], pid: int) -> Path:
    """``<bindspace>/stacks/<pid>.txt``: where process *pid* dumps its stacks.

    *pid* is the process's pid as it sees itself (inside a pid namespace, the
    namespace's pid).
    """
    return Path(bindspace) / STACKS_DIRNAME / f"{pid}.txt"


def enable(
    rtvars: RuntimeVars | None = None, *, signum: int | None = None
) -> Path | None:
    """Dump this process's stacks to its file in the bindspace on a signal.

    *rtvars* defaults to this process's envelope; when it has no bindspace
    (no envelope, or the bindspace folder is gone) nothing is registered and
    ``None`` is returned, so the call is harmless outside a session.
    *signum* overrides the envelope's ``diag_signal``. Returns the stacks
    file, ``<bindspace>/stacks/<pid>.txt``, truncated so that it holds only
    this process's dumps.

    A handler already installed for the signal keeps running after the dump
    (``chain``). Without one, the dump is all the signal does: chaining to
    the default action would terminate the process. Raises `HarnessError`
    for a signal that cannot be used and `RtVarsError` for a malformed
    envelope.
    """
    if rtvars is None:
        rtvars = load_rtvars(missing_ok=True)
    sig = resolve_signal(signum if signum is not None else rtvars.diag_signal)
    if not rtvars.bindspace:
        log.debug("No bindspace in the envelope; stack dumps stay off.")
        return None
    bindspace = Path(rtvars.bindspace)
    if not bindspace.is_dir():
        log.warning(
            "The bindspace %s does not exist; stack dumps on %s stay off.",
            bindspace,
            sig.name,
        )
        return None
    path = _register(sig, bindspace)
    _install_fork_hook()
    return path


def _register(sig: signal.Signals, bindspace: Path) -> Path:
    global _registration  # noqa: PLW0603 - one registration per process
    with contextlib.suppress(FileExistsError):
        os.mkdir(bindspace / STACKS_DIRNAME, 0o700)
    path = stacks_file(bindspace, os.getpid())
    fd = _open_stacks_file(path)
    old = _registration
    if old is not None and old.sig == sig:
        # faulthandler remembers the handler it replaced on the first
        # registration only, so the first decision about chaining stands.
        chain = old.chain
    else:
        if old is not None:
            faulthandler.unregister(old.sig)
        chain = _has_previous_handler(sig)
    faulthandler.register(sig, file=fd, all_threads=True, chain=chain)
    if old is not None:
        os.close(old.fd)
    _registration = _Registration(sig, bindspace, fd, chain)
    log.debug("Registered stack dumps on %s into %s (chain=%s).", sig.name, path, chain)
    return path


def _open_stacks_file(path: Path) -> int:
    # O_NOFOLLOW: a link planted at our file name is refused, not followed.
    # O_CLOEXEC: programs this process execs must not inherit the descriptor.
    # O_TRUNC: a file left by an earlier process with the same pid is stale.
    # O_APPEND: each dump lands after the last, so a reader can take the new
    # part from the size it saw before sending the signal.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _has_previous_handler(sig: signal.Signals) -> bool:
    """Whether something besides the default action handles *sig* now.

    `signal.getsignal` returns ``None`` for a handler installed outside
    Python; that one is kept too.
    """
    handler = signal.getsignal(sig)
    return handler not in (signal.SIG_DFL, signal.SIG_IGN)


def _install_fork_hook() -> None:
    global _fork_hook_installed  # noqa: PLW0603 - installed once per process
    if not _fork_hook_installed:
        os.register_at_fork(after_in_child=_reregister_in_child)
        _fork_hook_installed = True


def _reregister_in_child() -> None:
    """After a fork, point the inherited handler at the child's own file."""
    global _registration  # noqa: PLW0603 - one registration per process
    old = _registration
    if old is None:
        return
    path = stacks_file(old.bindspace, os.getpid())
    try:
        fd = _open_stacks_file(path)
    except OSError as exc:
        # The child must not write into its parent's file: stop dumping.
        faulthandler.unregister(old.sig)
        os.close(old.fd)
        _registration = None
        log.warning("Stack dumps are off in process %s: %s.", os.getpid(), exc)
        return
    faulthandler.register(old.sig, file=fd, all_threads=True, chain=old.chain)
    os.close(old.fd)
    _registration = _Registration(old.sig, old.bindspace, fd, old.chain)


def registered_signal() -> signal.Signals | None:
    """The signal this process dumps its stacks on, or ``None``."""
    return None if _registration is None else _registration.sig
