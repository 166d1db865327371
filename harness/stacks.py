"""Capturing the Python stacks of a session's processes, from outside them.

Two methods, tried in this order for each process:

``py-spy``
    ``py-spy dump --pid PID`` reads the interpreter's memory with ``ptrace``
    (Linux) and needs no cooperation from the process. It needs permission to
    trace: the same user and a ``kernel.yama.ptrace_scope`` of 0, or root, or
    ``CAP_SYS_PTRACE`` in a container. The binary is looked up in
    ``$HARNESS_PY_SPY`` (set it empty to disable ``py-spy``), next to the
    running interpreter, then on ``PATH``.

``faulthandler``
    The process called `harness.faulthandler_hook.enable`, which registered a
    signal (the envelope's ``diag_signal``, default ``SIGUSR2``). The capturer
    sends that signal only when ``/proc/<pid>/status`` shows the process
    catches it (an uncaught ``SIGUSR2`` would terminate it), then reads what
    the handler appended to ``<bindspace>/stacks/<pid>.txt``.

A process neither method serves is still listed, with the reason: ptrace not
permitted, no handler registered, not a Python process, exited. Nothing here
kills or stops a process; the only signal sent is the dump signal, to a
process that catches it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import psutil

from harness.errors import HarnessError
from harness.faulthandler_hook import resolve_signal, stacks_file
from harness.rtvars import RuntimeVars, get_rtvars

log = logging.getLogger("harness.stacks")

#: Where to find py-spy: a path, or empty to disable it (the fallback path).
PY_SPY_ENV: Final = "HARNESS_PY_SPY"

Method = Literal["py-spy", "faulthandler"]

#: A process to capture and how it was attributed to the session
#: (``"descendant"``, ``"envelope"``, ...). A `psutil.Process` guards against
#: a recycled pid; a bare pid is looked up when the capture starts.
Target = tuple["int | psutil.Process", str]


class _Auto:
    def __repr__(self) -> str:
        return "AUTO"


#: Let `find_py_spy` decide where py-spy is.
AUTO: Final = _Auto()


@dataclass(frozen=True, slots=True)
class Frame:
    """One call in a thread's stack."""

    function: str
    filename: str
    lineno: int | None

    def where(self) -> str:
        line = "?" if self.lineno is None else str(self.lineno)
        return f"{self.filename}:{line}"


@dataclass(frozen=True, slots=True)
class ThreadStack:
    """One thread's stack, innermost call first (as both tools print it).

    *ident* is the thread's ``pthread`` id in hex (``threading.get_ident``),
    the same for both methods, so snapshots taken by different methods still
    match thread by thread.
    """

    ident: str
    name: str | None
    frames: tuple[Frame, ...]
    state: str | None = None
    """``"active"``/``"idle"`` from py-spy, ``"current"`` from faulthandler."""


@dataclass(frozen=True, slots=True)
class ProcessStacks:
    """What one capture found for one process."""

    pid: int
    how: str
    ppid: int | None = None
    cmdline: tuple[str, ...] = ()
    method: Method | None = None
    """The method that served the capture; ``None`` when none did."""
    threads: tuple[ThreadStack, ...] = ()
    error: str | None = None
    """Why the process could not be captured (``None`` when it was)."""
    notes: tuple[str, ...] = ()
    """What was tried and failed before the method that served."""
    captured_at: float = field(default_factory=time.time)
    raw: str = ""
    """The tool's own output, kept for the report when parsing found nothing."""

    @property
    def captured(self) -> bool:
        return self.method is not None

    @property
    def command(self) -> str:
        return " ".join(self.cmdline) if self.cmdline else "?"


# ---------------------------------------------------------------- py-spy


def find_py_spy(env: dict[str, str] | None = None) -> str | None:
    """The py-spy executable to use, or ``None`` when there is none.

    ``$HARNESS_PY_SPY`` wins: a path (or a name on ``PATH``) to use, or empty
    to disable py-spy. Otherwise the ``py-spy`` beside `sys.executable` (a
    virtualenv that installed it), then ``PATH``.
    """
    source = os.environ if env is None else env
    if PY_SPY_ENV in source:
        value = source[PY_SPY_ENV].strip()
        if not value:
            return None
        found = shutil.which(value)
        if found is None:
            msg = (
                f"${PY_SPY_ENV} is {value!r}, which is not an executable; set it "
                "to the path of py-spy, or to an empty string to disable py-spy"
            )
            raise HarnessError(msg)
        return found
    beside = Path(sys.executable).parent / "py-spy"
    if os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("py-spy")


def _py_spy_dump(py_spy: str, pid: int, timeout: float) -> tuple[str, str | None]:
    """Run py-spy once; return ``(stdout, error)``."""
    cmd = [py_spy, "dump", "--pid", str(pid), "--json", "--full-filenames"]
    env = {**os.environ, "RUST_BACKTRACE": "0"}
    log.debug("Running %s.", cmd)
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return "", f"py-spy did not answer within {timeout:g} s"
    except OSError as exc:
        return "", f"py-spy could not run ({py_spy!r}): {exc.strerror}"
    if done.returncode == 0:
        return done.stdout, None
    return "", _py_spy_reason(done.stderr)


def _py_spy_reason(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    text = "; ".join(
        line.removeprefix("Error: ")
        for line in lines
        if not line.startswith(("Stack backtrace", "Caused by"))
        and not re.match(r"^\d+:", line)
    )
    lowered = text.lower()
    if "permission" in lowered or "operation not permitted" in lowered:
        return f"ptrace not permitted (py-spy: {text})"
    if "python version" in lowered or "python interpreter" in lowered:
        return f"not a Python process, or not one py-spy knows (py-spy: {text})"
    return f"py-spy failed: {text or 'no message'}"


def _parse_py_spy_json(text: str) -> tuple[ThreadStack, ...]:
    threads = []
    for item in json.loads(text):
        frames = tuple(
            Frame(
                function=str(frame.get("name", "?")),
                filename=str(frame.get("filename") or frame.get("short_filename")),
                lineno=frame.get("line"),
            )
            for frame in item.get("frames", ())
        )
        ident = item.get("thread_id")
        threads.append(
            ThreadStack(
                ident=f"0x{ident:016x}" if isinstance(ident, int) else str(ident),
                name=item.get("thread_name"),
                frames=frames,
                state="active" if item.get("active") else "idle",
            )
        )
    return tuple(threads)


# ---------------------------------------------------------------- faulthandler

_FH_THREAD = re.compile(
    r"^(?P<current>Current thread|Thread) (?P<ident>0x[0-9a-fA-F]+)"
    r"(?: \[(?P<name>[^\]]*)\])? \(most recent call first\):\s*$"
)
_FH_STACK = re.compile(r"^Stack \(most recent call first\):\s*$")
_FH_FRAME = re.compile(
    r'^\s+File "(?P<file>.*)", line (?P<line>\d+|\?+) in (?P<func>.*)$'
)


def parse_faulthandler(text: str) -> tuple[ThreadStack, ...]:
    """Parse one `faulthandler` dump (``all_threads=True``) into threads."""
    threads: list[ThreadStack] = []
    ident: str | None = None
    name: str | None = None
    state: str | None = None
    frames: list[Frame] = []

    def flush() -> None:
        if ident is not None:
            threads.append(ThreadStack(ident, name, tuple(frames), state))

    for line in text.splitlines():
        if match := _FH_THREAD.match(line):
            flush()
            ident, name = match["ident"].lower(), match["name"]
            ident = f"0x{int(ident, 16):016x}"
            state = "current" if match["current"].startswith("Current") else None
            frames = []
        elif _FH_STACK.match(line):
            flush()
            ident, name, state, frames = "0x0", None, None, []
        elif (match := _FH_FRAME.match(line)) and ident is not None:
            lineno = int(match["line"]) if match["line"].isdigit() else None
            frames.append(Frame(match["func"], match["file"], lineno))
    flush()
    return tuple(threads)


def catches_signal(pid: int, sig: int) -> bool | None:
    """Whether process *pid* has a handler for *sig* (``SigCgt``), or ``None``
    when ``/proc/<pid>/status`` cannot be read."""
    status = _proc_status(pid)
    if status is None or "SigCgt" not in status:
        return None
    return bool(int(status["SigCgt"], 16) >> (int(sig) - 1) & 1)


def _proc_status(pid: int) -> dict[str, str] | None:
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as file:
            lines = file.read().splitlines()
    except OSError:
        return None
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _inner_pid(pid: int) -> int:
    """The pid the process sees for itself (the innermost of ``NSpid``)."""
    status = _proc_status(pid)
    if status and status.get("NSpid"):
        return int(status["NSpid"].split()[-1])
    return pid


def _looks_like_python(proc: psutil.Process) -> bool:
    try:
        names = [proc.name(), *proc.cmdline()[:1]]
        exe = proc.exe()
    except (psutil.Error, OSError):
        return True  # cannot tell: do not claim it is not Python
    names.append(exe)
    if any("python" in Path(n).name.lower() for n in names if n):
        return True
    try:
        return any("libpython" in m.path for m in proc.memory_maps())
    except (psutil.Error, OSError):
        return True


def _faulthandler_dump(
    proc: psutil.Process,
    envelope: RuntimeVars,
    *,
    signum: int | None,
    bindspace: str | None,
    timeout: float,
) -> tuple[tuple[ThreadStack, ...], str, str | None]:
    """Signal *proc* and read its dump; return ``(threads, raw, error)``."""
    try:
        sig = resolve_signal(signum if signum is not None else envelope.diag_signal)
    except HarnessError as exc:
        return (), "", str(exc)
    folder = envelope.bindspace or bindspace
    if not folder:
        return (), "", "no faulthandler fallback: its envelope names no bindspace"
    caught = catches_signal(proc.pid, sig)
    if caught is None:
        return (), "", f"cannot read /proc/{proc.pid}/status to check for a handler"
    if not caught:
        if not _looks_like_python(proc):
            why = "not a Python process"
        else:
            why = (
                f"no handler registered for {sig.name} (the process did not call "
                "harness.faulthandler_hook.enable())"
            )
        return (), "", why
    path = stacks_file(folder, _inner_pid(proc.pid))
    before = _size(path)
    log.debug("Sending %s to %s for its stacks in %s.", sig.name, proc.pid, path)
    try:
        proc.send_signal(sig)
    except psutil.NoSuchProcess:
        return (), "", "exited before it could be signalled"
    except psutil.AccessDenied:
        return (), "", f"not permitted to send {sig.name} (another user's process)"
    raw = _wait_for_dump(path, before, timeout)
    if not raw:
        return (
            (),
            "",
            f"catches {sig.name} but wrote nothing to {str(path)!r} within "
            f"{timeout:g} s (another handler for {sig.name} may have replaced "
            "faulthandler's)",
        )
    return parse_faulthandler(raw), raw, None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _wait_for_dump(path: Path, before: int, timeout: float) -> str:
    """What was appended to *path* after *before* bytes, once it stops growing.

    faulthandler writes the dump from the signal handler in many small
    writes with no end marker, so the dump counts as complete once the file
    has not grown for a short while.
    """
    deadline = time.monotonic() + timeout
    last_size, last_change = before, time.monotonic()
    while time.monotonic() < deadline:
        size = _size(path)
        now = time.monotonic()
        if size != last_size:
            last_size, last_change = size, now
        elif size != before and now - last_change >= 0.15:
            break
        time.sleep(0.02)
    if last_size == before:
        return ""
    # A file shorter than before was truncated by a new `enable`: read it all.
    start = before if last_size > before else 0
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return ""
    try:
        os.lseek(fd, start, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "replace")


# ---------------------------------------------------------------- capture


def capture_process(
    target: Target,
    *,
    py_spy: str | _Auto | None = AUTO,
    signum: int | None = None,
    bindspace: str | None = None,
    timeout: float = 10.0,
) -> ProcessStacks:
    """Capture the stacks of one process, by py-spy else by faulthandler.

    *target* is ``(pid or psutil.Process, how)``. *py_spy* is the executable
    (`AUTO`: `find_py_spy`; ``None``: never use py-spy). *signum* and
    *bindspace* are used for the faulthandler fallback when the process's own
    envelope does not name them. Never raises for a process that is gone or
    out of reach: the result's ``error`` says why.
    """
    spec, how = target
    try:
        proc = spec if isinstance(spec, psutil.Process) else psutil.Process(spec)
        if not proc.is_running():
            raise psutil.NoSuchProcess(proc.pid)
    except psutil.NoSuchProcess:
        pid = spec.pid if isinstance(spec, psutil.Process) else int(spec)
        return ProcessStacks(pid=pid, how=how, error="exited before the capture")
    pid = proc.pid
    try:
        with proc.oneshot():
            ppid = proc.ppid()
            status = proc.status()
            try:
                cmdline = tuple(proc.cmdline())
            except psutil.AccessDenied:
                cmdline = ()
    except psutil.NoSuchProcess:
        return ProcessStacks(pid=pid, how=how, error="exited before the capture")
    base = functools.partial(
        ProcessStacks, pid=pid, how=how, ppid=ppid, cmdline=cmdline
    )
    if status == psutil.STATUS_ZOMBIE:
        return base(error="zombie: it exited and its parent has not reaped it yet")

    notes: list[str] = []
    spy = find_py_spy() if isinstance(py_spy, _Auto) else py_spy
    if spy is None:
        notes.append(_why_no_py_spy(py_spy))
    else:
        out, error = _py_spy_dump(spy, pid, timeout)
        if error is not None and not error.startswith("ptrace"):
            # py-spy sometimes misreads a process that is busy starting up or
            # switching threads; one more attempt settles most of those.
            out, error = _py_spy_dump(spy, pid, timeout)
        if error is None:
            try:
                threads = _parse_py_spy_json(out)
            except (ValueError, TypeError, AttributeError) as exc:
                error = f"py-spy printed output that is not its JSON ({exc})"
            else:
                return base(method="py-spy", threads=threads, raw=out)
        notes.append(error)

    try:
        envelope = get_rtvars(proc, missing_ok=True)
    except (psutil.Error, HarnessError) as exc:
        log.debug("Cannot read the envelope of %s: %s.", pid, exc)
        envelope = RuntimeVars()
    threads, raw, error = _faulthandler_dump(
        proc,
        envelope,
        signum=signum,
        bindspace=bindspace,
        timeout=min(timeout, 3.0),
    )
    if error is None:
        return base(method="faulthandler", threads=threads, raw=raw, notes=tuple(notes))
    notes.append(error)
    return base(error="; ".join(notes), notes=tuple(notes))


def _why_no_py_spy(requested: str | _Auto | None) -> str:
    if not isinstance(requested, _Auto):
        return "py-spy disabled by the caller"
    if os.environ.get(PY_SPY_ENV, None) == "":
        return f"py-spy disabled (${PY_SPY_ENV} is empty)"
    return "py-spy not found (pip install py-spy, or set $HARNESS_PY_SPY to it)"


def capture_stacks(
    targets: Iterable[Target],
    *,
    py_spy: str | _Auto | None = AUTO,
    signum: int | None = None,
    bindspace: str | None = None,
    timeout: float = 10.0,
    workers: int = 4,
) -> list[ProcessStacks]:
    """Capture every target (see `capture_process`), a few at a time.

    Results come in the order of *targets*. Duplicated pids are captured
    once, keeping the first *how*.
    """
    seen: set[int] = set()
    unique: list[Target] = []
    for spec, how in targets:
        pid = spec.pid if isinstance(spec, psutil.Process) else int(spec)
        if pid not in seen:
            seen.add(pid)
            unique.append((spec, how))
    spy = find_py_spy() if isinstance(py_spy, _Auto) else py_spy
    requested = py_spy if spy is None else spy
    log.info(
        "Capturing the stacks of %d processes (py-spy: %s).", len(unique), spy or "off"
    )
    if not unique:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(unique)))) as pool:
        results = list(
            pool.map(
                lambda t: capture_process(
                    t,
                    py_spy=requested,
                    signum=signum,
                    bindspace=bindspace,
                    timeout=timeout,
                ),
                unique,
            )
        )
    return results
