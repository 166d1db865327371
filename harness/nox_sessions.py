"""nox sessions for the test matrix, registered by one line in a noxfile.

::

    # noxfile.py
    import harness.nox_sessions

    harness.nox_sessions.register()

registers one session per cell of `harness.matrix.Matrix`, named exactly
``tests-<backend>-<transport>``, tagged ``tests``, ``<backend>`` and
``<transport>``, and allowed to run in parallel, so ``nox -j auto -t tests``
runs the whole matrix at once. Each session runs the configured test command
inside ``harness exec`` (a lease, a bindspace, an envelope and a leak check
per session), writes JUnit XML and the leak report under
``reports/<session>/<run-id>/``, and passes ``nox -s NAME -- ARGS`` through.

Concurrent runs of the same session. nox creates a session's virtualenv
(``.nox/<session>``) before the session body runs, and recreates it on every
run: two ``nox -s tests-trio-tcp`` started together would delete each other's
virtualenv mid-run. So the sessions are registered with ``venv_backend=
"none"`` and the body makes the virtualenv itself, with nox's own
`nox.virtualenv.VirtualEnv`, under a lock file next to it
(``.nox/<session>.harness-lock``, ``flock``):

- a run that *uses* the virtualenv holds a shared lock until it ends;
- (re)creating and installing needs the exclusive lock, so it happens only
  while nobody uses the virtualenv;
- a virtualenv that was built with the same interpreter and install
  arguments while this run waited for the lock, or that another run is
  using right now, is shared rather than rebuilt.

The kernel drops a killed process's lock, so a crashed run never blocks the
next. Run folders are per run (``<run-id>`` is time and pid, so they sort by
time), and reports never overwrite each other.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from harness.config import HarnessConfig, load_config, resolve_leaks_mode
from harness.errors import HarnessError
from harness.matrix import Cell, Matrix

if TYPE_CHECKING:
    import nox

log = logging.getLogger("harness.nox_sessions")

#: Written into a virtualenv once it is created and installed; what it holds
#: decides whether another run may reuse that virtualenv.
MARKER: Final = ".harness-venv.json"

#: The file ``flock``-ed next to each virtualenv.
LOCK_SUFFIX: Final = ".harness-lock"

#: How often a run tries to hold a virtualenv built to its spec before it
#: gives up (only runs with other specs rebuilding it in between make it
#: try again).
ATTEMPTS: Final = 10


def register(pyproject: Path | str | None = None) -> list[str]:
    """Register one nox session per run of the matrix; return their names.

    *pyproject* is the ``pyproject.toml`` holding ``[tool.harness]`` (or a
    folder to search upwards from); by default the one at or above the
    current directory, which under nox is the noxfile's folder. Raises
    `HarnessError` for a bad ``[tool.harness]``, which nox shows when it
    loads the noxfile.
    """
    import nox

    config = load_config(pyproject)
    matrix = Matrix(config)
    for run in matrix.runs():
        # One registration per Python version: nox does not expand a list
        # of pythons for a session whose venv_backend is "none".
        nox.session(
            name=run.name,
            python=run.python,
            tags=list(run.tags),
            venv_backend="none",
            allow_parallel=True,
        )(_session_body(config, run.cell))
    return matrix.names()


def _session_body(config: HarnessConfig, cell: Cell) -> Callable[..., None]:
    def session_body(session: nox.Session) -> None:
        run_cell(session, config, cell)

    session_body.__doc__ = (
        f"Run the tests with the {cell.backend} spawn backend over "
        f"{cell.transport}, in a harness session."
    )
    session_body.__name__ = cell.session.replace("-", "_")
    return session_body


def default_venv_backend() -> str:
    """``uv`` where nox finds uv, else ``virtualenv``."""
    import nox.virtualenv

    return "uv" if nox.virtualenv.HAS_UV else "virtualenv"


# ------------------------------------------------------------------ the body


def run_cell(session: nox.Session, config: HarnessConfig, cell: Cell) -> None:
    """The body of a matrix session: virtualenv, then the command in
    ``harness exec``."""
    if cell.transport == "uds" and not hasattr(socket, "AF_UNIX"):
        session.skip(
            "this platform has no AF_UNIX sockets; exclude the uds transport "
            "for it in [tool.harness] exclude"
        )
    python = session.python if isinstance(session.python, str) else None
    options = _nox_options(session)
    project = Path.cwd()
    run_dir = make_run_dir(project / config.reports_dir / session.name)

    with prepared_venv(session, config, python, options) as venv:
        command = build_command(
            config,
            cell,
            python=python,
            session_name=session.name,
            posargs=list(session.posargs),
            run_dir=run_dir,
        )
        leaks = resolve_leaks_mode(config, dict(os.environ))
        exec_args = build_exec_args(
            config, cell, session_name=session.name, leaks=leaks, run_dir=run_dir
        )
        env = venv.env() if venv is not None else {}
        session.log(f"Reports of this run go to {run_dir}")
        session.run(
            sys.executable,
            "-m",
            "harness",
            *exec_args,
            "--",
            *command,
            external=True,
            env=env,
        )


def build_command(
    config: HarnessConfig,
    cell: Cell,
    *,
    python: str | None,
    session_name: str,
    posargs: list[str],
    run_dir: Path | None,
) -> list[str]:
    """The test command of *cell*: ``command`` split like a shell line, the
    placeholders filled in, ``flags`` and ``--junitxml`` appended."""
    values = {
        "backend": cell.backend,
        "transport": cell.transport,
        "python": python or "",
        "session": session_name,
    }
    words: list[str] = []
    for word in shlex.split(config.command):
        if word == "{posargs}":
            words.extend(posargs)
        else:
            words.append(word.format(**values))
    words.extend(flag.format(**values) for flag in config.flags)
    if config.junit_xml and run_dir is not None:
        words.append(f"--junitxml={run_dir / 'junit.xml'}")
    return words


def build_exec_args(
    config: HarnessConfig,
    cell: Cell,
    *,
    session_name: str,
    leaks: str,
    run_dir: Path,
) -> list[str]:
    """The ``harness exec`` options for one run of *cell* (no ``--``)."""
    args = [
        "exec",
        "--name",
        session_name,
        "--backend",
        cell.backend,
        "--transport",
        cell.transport,
        "--bindspace-folder",
        config.bindspace_name,
        "--leaks",
        leaks,
        "--report",
        str(run_dir / "leaks.json"),
    ]
    if config.isolate != "none":
        args += ["--isolate", config.isolate]
    if config.timeout is not None:
        args += ["--timeout", f"{config.timeout:g}"]
    if config.silence is not None:
        args += ["--silence", f"{config.silence:g}"]
    return args


def make_run_dir(session_reports: Path) -> Path:
    """Create ``<session_reports>/<run-id>/``, unique to this run.

    The run id is the local time and the pid (``20261203-163012-4242``), so
    run folders sort by time; two runs started in the same second differ by
    pid, and a folder that exists already is never reused.
    """
    session_reports.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for attempt in range(100):
        suffix = f"-{attempt}" if attempt else ""
        path = session_reports / f"{stamp}-{os.getpid()}{suffix}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    msg = (
        f"cannot create a run folder under {str(session_reports)!r}: 100 names "
        "are taken; remove old runs"
    )
    raise HarnessError(msg)


# ------------------------------------------------------------- nox's options


@dataclass(frozen=True)
class NoxOptions:
    """What the nox command line asked for that the body must honour."""

    force_venv_backend: str | None
    default_venv_backend: str | None
    reuse: bool
    no_install: bool
    download_python: str


def _nox_options(session: nox.Session) -> NoxOptions:
    # nox exposes no public view of its merged command-line options; the
    # session's runner holds them. Without it (another nox), act as plain
    # `nox -s NAME` would: recreate the virtualenv and install.
    runner = session.__dict__.get("_runner")
    config = getattr(runner, "global_config", None)
    func = getattr(runner, "func", None)
    if config is None or func is None:
        return NoxOptions(None, None, False, False, "auto")
    from nox.sessions import resolve_reuse_existing_venv

    default = getattr(config, "default_venv_backend", None)
    # nox fills in "virtualenv" when -db is not given, so that value cannot
    # be told from an explicit choice; it means "ours" (uv where installed).
    # `--force-venv-backend virtualenv` forces virtualenv.
    if default == "virtualenv":
        default = None
    return NoxOptions(
        force_venv_backend=getattr(config, "force_venv_backend", None),
        default_venv_backend=default,
        reuse=resolve_reuse_existing_venv(config, func),
        no_install=bool(getattr(config, "no_install", False)),
        download_python=getattr(config, "download_python", None) or "auto",
    )


# --------------------------------------------------- the shared virtualenv


@dataclass(frozen=True)
class Venv:
    """A virtualenv a run uses: where it is and the environment to run in."""

    location: Path

    @property
    def bin(self) -> Path:
        return self.location / ("Scripts" if sys.platform == "win32" else "bin")

    @property
    def python(self) -> Path:
        return self.bin / "python"

    def env(self) -> dict[str, str | None]:
        """Variables that make commands resolve from this virtualenv."""
        path = os.environ.get("PATH", "")
        return {
            "VIRTUAL_ENV": str(self.location),
            "PATH": f"{self.bin}{os.pathsep}{path}" if path else str(self.bin),
            "PYTHONHOME": None,
            "CONDA_PREFIX": None,
        }


@contextlib.contextmanager
def prepared_venv(
    session: nox.Session,
    config: HarnessConfig,
    python: str | None,
    options: NoxOptions,
) -> Iterator[Venv | None]:
    """The session's virtualenv, created and installed if needed, held with
    a shared lock until the block ends; ``None`` under ``--no-venv``."""
    backend = (
        options.force_venv_backend
        or options.default_venv_backend
        or default_venv_backend()
    )
    backend = _first_available(backend)
    if backend == "none":
        session.log("No virtualenv (--no-venv): the command runs in nox's own.")
        yield None
        return
    if backend not in ("uv", "virtualenv", "venv"):
        session.error(
            f"the harness's sessions support the uv, virtualenv and venv "
            f"backends, not {backend!r}; pass --force-venv-backend uv (or "
            "virtualenv, or none)"
        )
    venv = Venv(session.env_dir)
    spec = {
        "backend": backend,
        "interpreter": python or sys.executable,
        "install": list(config.install),
    }

    def build(reuse_ok: bool) -> None:
        _build_venv(
            session,
            venv=venv,
            backend=backend,
            python=python,
            spec=spec,
            options=options,
            reuse_ok=reuse_ok,
        )

    with venv_lock(venv.location, spec, reuse=options.reuse, build=build):
        yield venv


def _first_available(backends: str) -> str:
    import nox.virtualenv

    for name in backends.split("|"):
        if name != "uv" or nox.virtualenv.HAS_UV:
            return name
    return backends.rsplit("|", maxsplit=1)[-1]


def _build_venv(
    session: nox.Session,
    *,
    venv: Venv,
    backend: str,
    python: str | None,
    spec: dict[str, Any],
    options: NoxOptions,
    reuse_ok: bool,
) -> None:
    """Create (or keep, when *reuse_ok*) the virtualenv and install into it.

    Runs with the exclusive lock held: nobody else uses the virtualenv.
    """
    from nox.virtualenv import VirtualEnv

    marker = venv.location / MARKER
    if not reuse_ok:
        with contextlib.suppress(FileNotFoundError):
            marker.unlink()
    env = VirtualEnv(
        str(venv.location),
        interpreter=python,
        reuse_existing=reuse_ok,
        venv_backend=backend,
        download_python=options.download_python,  # type: ignore[arg-type]
    )
    created = env.create()
    if created or not options.no_install:
        _install(session, venv, backend, spec["install"])
        _write_marker(marker, spec)


def _install(session: nox.Session, venv: Venv, backend: str, args: list[str]) -> None:
    if not args:
        return
    if backend == "uv":
        import nox.virtualenv

        cmd = [nox.virtualenv.UV, "pip", "install", "--python", str(venv.python)]
    else:
        cmd = [str(venv.python), "-m", "pip", "install"]
    session.run(*cmd, *args, external=True, env=venv.env())


def _write_marker(marker: Path, spec: dict[str, Any]) -> None:
    tmp = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"spec": spec, "created_at": time.time()}))
    os.replace(tmp, marker)


def _read_marker(location: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((location / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _usable(location: Path, spec: dict[str, Any]) -> dict[str, Any] | None:
    """The marker of a complete virtualenv built to *spec*, else ``None``."""
    marker = _read_marker(location)
    python = location / ("Scripts" if sys.platform == "win32" else "bin") / "python"
    if marker is None or marker.get("spec") != spec or not python.exists():
        return None
    return marker


@contextlib.contextmanager
def venv_lock(
    location: Path,
    spec: dict[str, Any],
    *,
    reuse: bool,
    build: Callable[[bool], None],
) -> Iterator[None]:
    """Hold the virtualenv at *location* in use for the block.

    On entry, either share a usable virtualenv (built to *spec*, and either
    built while this call waited, or in use by another run, or *reuse*
    asked for) under a shared lock, or take the exclusive lock, call
    ``build(reuse_ok)`` and then hold a shared lock. See the module
    docstring for why.
    """
    location.parent.mkdir(parents=True, exist_ok=True)
    lock_path = location.with_name(location.name + LOCK_SUFFIX)
    # A virtualenv built to our spec while we waited for the lock was built
    # for a run started with ours: use it. One built before is rebuilt, as
    # nox rebuilds on every run unless told to reuse.
    started_at = time.time()
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        for _attempt in range(ATTEMPTS):
            if _hold_built(
                fd,
                location=location,
                spec=spec,
                reuse=reuse,
                started_at=started_at,
                build=build,
            ):
                break
        else:
            msg = (
                f"the virtualenv {str(location)!r} was rebuilt by other runs "
                f"{ATTEMPTS} times before this one could use it, or its build "
                f"leaves no {MARKER}; run the sessions with one install "
                "configuration at a time, or delete it and retry"
            )
            raise HarnessError(msg)
        yield
    finally:
        # Closing the descriptor drops the lock; so does the kernel when the
        # process dies, which is why a killed run never blocks the next.
        os.close(fd)


def _hold_built(
    fd: int,
    *,
    location: Path,
    spec: dict[str, Any],
    reuse: bool,
    started_at: float,
    build: Callable[[bool], None],
) -> bool:
    """One attempt to end up holding a shared lock on a usable virtualenv."""
    if not _try_lock(fd, fcntl.LOCK_EX):
        # Someone builds or uses it. Wait until nobody builds, then share
        # what is there if it is what we need.
        log.info("Waiting for another run that holds %s.", location)
        fcntl.flock(fd, fcntl.LOCK_SH)
        if _usable(location, spec) is not None:
            log.info("Sharing the virtualenv %s with another run.", location)
            return True
        # Built to another spec (or not at all) and in use: wait for the
        # users to finish, then build it ourselves.
        fcntl.flock(fd, fcntl.LOCK_UN)
        log.warning(
            "The virtualenv %s is in use by another run and was built "
            "differently; waiting until that run ends to rebuild it.",
            location,
        )
        fcntl.flock(fd, fcntl.LOCK_EX)

    # Exclusive: nobody else uses the virtualenv, so it may be rebuilt.
    marker = _usable(location, spec)
    fresh = marker is not None and marker["created_at"] >= started_at
    if marker is not None and fresh:
        log.info("Reusing %s: another run built it while this one waited.", location)
    elif marker is not None and reuse:
        build(True)
    else:
        log.debug("Building the virtualenv %s under its lock.", location)
        build(False)

    # Downgrade so that waiting runs may share it. flock's downgrade is not
    # atomic: another run may take the exclusive lock in between and rebuild
    # to its own spec; check that what we now hold is still ours.
    fcntl.flock(fd, fcntl.LOCK_SH)
    if _usable(location, spec) is None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    return True


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True
