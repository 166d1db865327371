"""The legs of a CI run: nox's own session list, checked against the matrix.

A *leg* is one nox session on one operating system: one GitHub Actions job.
The list of sessions comes from nox itself (``nox -l --json -t tests``), so a
leg always names a session that ``nox -s`` can run; `harness.matrix.Matrix`
(``[tool.harness]``) says what the list must be, and `check_drift` refuses to
go on when the two disagree (a hand-edited noxfile, a stale install). The
operating systems are crossed in here, because a GitHub Actions ``include``
list cannot be crossed with another axis by the workflow itself.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from harness.errors import HarnessError

log = logging.getLogger("harness.ci.nox_listing")

#: The tag every test session carries (``[tool.harness] session-prefix``).
DEFAULT_TAG: Final = "tests"

#: Characters an artifact name may not hold (upload-artifact refuses them).
_ARTIFACT_UNSAFE: Final = re.compile(r'[":<>|*?\\/\r\n\s]+')


@dataclass(frozen=True)
class NoxSession:
    """One entry of ``nox -l --json``: what ``nox -s`` takes, and its facts."""

    session: str
    """The id ``nox -s`` takes, e.g. ``tests-trio-tcp`` or ``tests-trio-tcp-3.13``."""
    name: str
    """The session's base name, without the Python version."""
    python: str | None
    """The Python version nox runs it on; ``None`` for nox's own interpreter."""
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Leg:
    """One nox session on one operating system: one CI job."""

    session: str
    name: str
    backend: str | None
    transport: str | None
    python: str
    """The interpreter the job installs (the session's own, or the default)."""
    os: str

    @property
    def title(self) -> str:
        """The job's name: the session, then the operating system."""
        return f"{self.session} ({self.os})"

    @property
    def artifact(self) -> str:
        """A unique, upload-safe artifact name: ``reports-<session>-<os>``."""
        return _ARTIFACT_UNSAFE.sub("_", f"reports-{self.session}-{self.os}")

    def as_include(self) -> dict[str, Any]:
        """The leg as one entry of a GitHub Actions ``matrix.include``."""
        return {
            "session": self.session,
            "name": self.name,
            "backend": self.backend,
            "transport": self.transport,
            "python": self.python,
            "os": self.os,
            "title": self.title,
            "artifact": self.artifact,
        }


def nox_command(python: str | None = None) -> list[str]:
    """The command that runs nox: ``<python> -m nox``, this interpreter's."""
    return [python or sys.executable, "-m", "nox"]


def list_nox_sessions(
    project: Path,
    *,
    tag: str = DEFAULT_TAG,
    nox_args: Sequence[str] = (),
) -> list[NoxSession]:
    """Run ``nox -l --json -t TAG`` in *project* and return its sessions.

    *nox_args* go to nox as well and must be the ones the sessions will later
    run with: ``--no-venv`` or ``-P`` change the ids nox lists. Raises
    `HarnessError` when nox fails or prints something that is not its JSON.
    """
    command = [*nox_command(), "--list", "--json", "--tags", tag, *nox_args]
    log.debug("Listing nox sessions: %s (in %s).", " ".join(command), project)
    result = subprocess.run(
        command, cwd=project, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-15:])
        msg = (
            f"`{' '.join(command[2:])}` failed in {str(project)!r} with status "
            f"{result.returncode}:\n{tail}\nRun the same command there to see why "
            "(is there a noxfile.py? is nox installed in this Python?)"
        )
        raise HarnessError(msg)
    return parse_nox_list(result.stdout, source=" ".join(command[2:]))


def parse_nox_list(text: str, *, source: str = "nox -l --json") -> list[NoxSession]:
    """Parse the output of ``nox -l --json``; raise `HarnessError` if malformed."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        msg = (
            f"`{source}` printed something that is not JSON ({exc}): "
            f"{text.strip()[:200]!r}; nox >= 2023.4.22 is needed for --json"
        )
        raise HarnessError(msg) from None
    if not isinstance(data, list):
        msg = f"`{source}` printed {type(data).__name__}, expected a JSON list"
        raise HarnessError(msg)
    sessions = []
    for entry in data:
        if not isinstance(entry, dict) or not isinstance(entry.get("session"), str):
            msg = f"`{source}` printed an entry without a session id: {entry!r}"
            raise HarnessError(msg)
        python = entry.get("python")
        sessions.append(
            NoxSession(
                session=entry["session"],
                name=str(entry.get("name") or entry["session"]),
                # nox reports False (no virtualenv) or None (its own
                # interpreter) for sessions that are not pinned to a version.
                python=python if isinstance(python, str) else None,
                tags=tuple(entry.get("tags") or ()),
            )
        )
    return sessions


def matrix_entries(project: Path) -> list[dict[str, Any]]:
    """The ``include`` list of ``harness matrix --json`` for *project*."""
    from harness.matrix import Matrix

    include: list[dict[str, Any]] = Matrix.load(project).github()["include"]
    return include


def matrix_cells(project: Path) -> list[str]:
    """The matrix's session names without Python versions, for *project*.

    This is what nox lists when ``--no-venv`` drops the Python axis.
    """
    from harness.matrix import Matrix

    return [cell.session for cell in Matrix.load(project)]


def check_drift(
    listed: Iterable[str], expected: Iterable[str], *, what: str = "sessions"
) -> None:
    """Raise `HarnessError` unless nox *listed* exactly the *expected* names.

    Order does not matter; names do. The message says which names only one
    side has, and how to bring them back in line.
    """
    from_nox, from_matrix = set(listed), set(expected)
    if from_nox == from_matrix:
        return
    lines = []
    if only_nox := sorted(from_nox - from_matrix):
        lines.append(f"  only in `nox -l`:         {', '.join(only_nox)}")
    if only_matrix := sorted(from_matrix - from_nox):
        lines.append(f"  only in `harness matrix`: {', '.join(only_matrix)}")
    msg = (
        f"the nox {what} and the [tool.harness] matrix disagree:\n"
        + "\n".join(lines)
        + "\nDefine the test sessions in noxfile.py with harness.nox_sessions "
        "(not by hand), reinstall the project (`pip install -e .`), and compare "
        "`nox -l -t tests` with `harness matrix --list`"
    )
    raise HarnessError(msg)


def _split_name(name: str) -> tuple[str | None, str | None]:
    """``tests-trio-tcp`` -> ``("trio", "tcp")``; ``(None, None)`` otherwise."""
    parts = name.split("-")
    if len(parts) == 3:
        return parts[1], parts[2]
    return None, None


def build_legs(
    nox_sessions: Sequence[NoxSession],
    entries: Sequence[dict[str, Any]] | None,
    *,
    oses: Sequence[str],
    default_python: str,
) -> list[Leg]:
    """Cross the sessions with *oses*: one `Leg` per (session, os), in order.

    Backend and transport come from the matrix *entries* when given, else from
    the session's name. A session not pinned to a Python version runs on
    *default_python*. Raises `HarnessError` when there is nothing to run,
    because GitHub refuses an empty matrix with a message that names neither
    the cause nor the fix.
    """
    if not oses:
        msg = "no operating system given; pass --os at least once (--os ubuntu-latest)"
        raise HarnessError(msg)
    if not nox_sessions:
        msg = (
            "nox lists no test sessions, so there is nothing to run; check "
            "`nox -l` and the sessions' tags in noxfile.py"
        )
        raise HarnessError(msg)
    by_session = {str(e["session"]): e for e in entries or ()}
    legs = []
    for os_name in oses:
        for nox_session in nox_sessions:
            entry = by_session.get(nox_session.session, {})
            backend, transport = _split_name(nox_session.name)
            legs.append(
                Leg(
                    session=nox_session.session,
                    name=nox_session.name,
                    backend=entry.get("backend", backend),
                    transport=entry.get("transport", transport),
                    python=nox_session.python or entry.get("python") or default_python,
                    os=os_name,
                )
            )
    return legs


def github_matrix(legs: Iterable[Leg]) -> dict[str, Any]:
    """``{"include": [...]}``: the value of a job's ``strategy.matrix``."""
    return {"include": [leg.as_include() for leg in legs]}
