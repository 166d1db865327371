"""Session records: what other processes need to know about a session.

A record is one JSON file, ``<runtime-dir>/harness/sessions/<id>.json``. It
is written to a temporary file in the same folder, flushed with ``fsync`` and
renamed into place, so a reader sees the old record or the new one, never a
half-written one, even when the writer is killed in between.

A record's state is derived, never stored:

- ``live``: the owner process (same pid *and* creation time) is running;
- ``stale``: the owner is gone without closing the session (SIGKILL, OOM);
- ``leaked``: the owner closed the session but kept the record because the
  leak check found leftovers (``--leaks warn``), for ``harness check`` and
  ``harness reap`` to act on later.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Literal

import msgspec
import psutil

from harness.atomic_write import write_atomic
from harness.errors import HarnessError
from harness.rtvars import RT_VARS_ENV
from harness.runtime_dir import ensure_private_dir, harness_state_dir

log = logging.getLogger("harness.records")

State = Literal["live", "stale", "leaked"]


class SessionRecord(msgspec.Struct, kw_only=True):
    """One session as seen from outside its owner process."""

    id: str
    """Unique id, ``<name>-<8 hex>``; also the bindspace's folder name."""
    name: str
    """What the user called it (the nox session name, or ``--name``)."""
    owner_pid: int
    """The process that opened the session and will close it."""
    owner_create_time: float
    """`psutil.Process.create_time` of the owner: guards against pid reuse."""
    uid: int
    runtime_dir: str
    bindspace: str
    port: int | None = None
    command: list[str] = msgspec.field(default_factory=list)
    started_at: float = msgspec.field(default_factory=time.time)
    backend: str | None = None
    transport: str | None = None
    envelope_name: str = RT_VARS_ENV
    isolate: list[str] = msgspec.field(default_factory=list)
    """Namespaces the command runs in (``net``, ``pid``), if any."""
    netns: str | None = None
    """``net:[inode]`` of the session's private network namespace."""
    pidns: str | None = None
    """``pid:[inode]`` of the session's private pid namespace."""
    closed_at: float | None = None
    exit_status: int | None = None
    leak_count: int | None = None
    report_path: str | None = None


def owner_alive(record: SessionRecord) -> bool:
    """Whether the record's owner still runs (same pid and creation time)."""
    try:
        proc = psutil.Process(record.owner_pid)
        # create_time is rounded differently by some platforms; 10 ms is far
        # below the time it takes to recycle a pid.
        return abs(proc.create_time() - record.owner_create_time) < 0.01 and (
            proc.status() != psutil.STATUS_ZOMBIE
        )
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True


def record_state(record: SessionRecord) -> State:
    """``live``, ``stale`` or ``leaked``; see the module docstring."""
    if record.closed_at is not None:
        return "leaked"
    return "live" if owner_alive(record) else "stale"


class SessionStore:
    """The folder of session records of one runtime dir."""

    def __init__(self, root: Path | None = None) -> None:
        self.dir = ensure_private_dir(harness_state_dir(root) / "sessions")

    def path(self, session_id: str) -> Path:
        return self.dir / f"{session_id}.json"

    def write(self, record: SessionRecord) -> Path:
        """Write *record* atomically (temp file, fsync, rename)."""
        final = self.path(record.id)
        data = msgspec.json.format(msgspec.json.encode(record), indent=2)
        log.debug("Writing session record %s.", final)
        try:
            return write_atomic(final, data + b"\n", mode=0o600)
        except OSError as exc:
            msg = (
                f"cannot write the session record {str(final)!r}: "
                f"{exc.strerror}; check that the runtime dir is writable and "
                "not full (or set $HARNESS_RUNTIME_DIR)"
            )
            raise HarnessError(msg) from None

    def read(self, session_id: str) -> SessionRecord:
        """The record of *session_id*; `HarnessError` if there is none."""
        path = self.path(session_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            msg = (
                f"no session {session_id!r} in {str(self.dir)!r}; "
                "`harness sessions` lists the known ones"
            )
            raise HarnessError(msg) from None
        try:
            return msgspec.json.decode(data, type=SessionRecord)
        except msgspec.DecodeError as exc:
            msg = f"the session record {str(path)!r} is unreadable: {exc}"
            raise HarnessError(msg) from None

    def remove_dead_writers_temp_files(self) -> list[Path]:
        """Remove temp files whose writer died before renaming them.

        `write` names its temp file ``.<id>.<pid>.tmp``; a writer killed
        between creating and renaming it leaves the file behind, and no
        reader ever looks at it. A file whose pid no longer runs is removed;
        one whose pid runs (the writer, or a process that got its pid) is
        left for a later call. Returns the files removed.
        """
        removed = []
        for path in self.dir.glob(".*.tmp"):
            try:
                pid = int(path.name[: -len(".tmp")].rsplit(".", 1)[1])
            except (IndexError, ValueError):
                continue  # not a name `write` makes
            if psutil.pid_exists(pid):
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
                log.info("Removed %s, left by a writer that died (pid %d).", path, pid)
        return removed

    def remove(self, session_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(session_id).unlink()

    def list(self) -> list[SessionRecord]:
        """Every readable record, oldest first. Unreadable files are skipped
        with a warning (they are never half-written by the harness)."""
        records = []
        for path in self.dir.glob("*.json"):
            try:
                records.append(
                    msgspec.json.decode(path.read_bytes(), type=SessionRecord)
                )
            except FileNotFoundError:
                continue  # closed while we listed
            except (OSError, msgspec.DecodeError) as exc:
                log.warning("Skipping unreadable session record %s: %s", path, exc)
        return sorted(records, key=lambda r: r.started_at)

    def find(self, prefix: str) -> SessionRecord:
        """The one record whose id is or starts with *prefix*."""
        exact = self.path(prefix)
        if exact.exists():
            return self.read(prefix)
        matches = [r for r in self.list() if r.id.startswith(prefix)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            msg = (
                f"no session matches {prefix!r}; `harness sessions` lists the "
                "known ones"
            )
        else:
            ids = ", ".join(r.id for r in matches)
            msg = f"{prefix!r} matches several sessions ({ids}); give more of the id"
        raise HarnessError(msg)
