"""`Session`: one isolated run, from its port lease to its leak check.

A session is one port lease, one bindspace, one envelope and one record::

    with Session("tests-trio-tcp", backend="trio", transport="tcp") as session:
        subprocess.run(cmd, env=session.env())

Opening goes in an order that leaves nothing unrecoverable when the owner
is killed (SIGKILL, OOM) at any point:

1. the port lease: an OS file lock, released by the kernel with the owner;
2. the bindspace, by exclusive ``mkdir`` (the arbiter of the session id);
   killed here, it is a bindspace without a record, which
   `prune_sessions` finds by scanning the bindspace folder;
3. the record, written atomically: from now on ``harness sessions`` lists
   the session, and once the owner is gone, as ``stale``.

Closing removes the bindspace, then the record, then releases the lease.
When the leak check found leftovers, the bindspace and the record stay,
marked with ``closed_at``, ``exit_status`` and ``leak_count``, for
``harness check`` and ``harness reap`` to act on.

The registry address in the envelope: for ``tcp`` it is
``('127.0.0.1', <leased port>)``. For ``uds`` it is the pair tractor uses
for Unix addresses, ``(<folder>, <file name>)``:
``(<bindspace>/tractor, 'registry@<leased port>.sock')``. The folder is the
one tractor computes itself from ``XDG_RUNTIME_DIR`` (which the session
points at the bindspace), and the name follows tractor's own
``registry@1616.sock``; the leased port keeps it unique on the host. A ``uds``
session leases a port all the same, so every session has one number that
`harness sessions` and the leak check can show.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

import msgspec

from harness.bindspace import (
    APP_FOLDER,
    DEFAULT_FOLDER,
    SOCKET_NAME_RESERVE,
    bindspace_contents,
    bindspace_env,
    bindspace_root,
    check_path_room,
    create_bindspace,
    list_bindspaces,
    remove_bindspace,
    socket_dir,
    unix_path_limit,
)
from harness.errors import HarnessError
from harness.records import SessionRecord, SessionStore, owner_alive
from harness.rtvars import RT_VARS_ENV, RuntimeVars, encode_rtvars
from harness.runtime_dir import runtime_dir as resolve_runtime_dir
from harness.session_id import SUFFIX_LEN, is_session_id, new_session_id

if TYPE_CHECKING:
    from harness.ports import PortLease

log = logging.getLogger("harness.session")

#: The transports a session knows how to address.
TRANSPORTS: Final = ("tcp", "uds")

#: How often `Session.open` draws a new id when the bindspace exists.
ID_ATTEMPTS: Final = 16

#: A bindspace without a record younger than this may belong to a session
#: that is opening right now (between its ``mkdir`` and its record).
ORPHAN_GRACE: Final = 60.0

#: Envelope fields that identify the session; extra runtime vars cannot
#: override them.
IDENTITY_FIELDS: Final = ("session", "bindspace")


class LeakCount(Protocol):
    """What `Session.close` needs of a leak report: how many leaks it holds.

    `harness.leaks.LeakReport` has it.
    """

    @property
    def leak_count(self) -> int: ...


class Session:
    """One isolated test session; a context manager.

    *name* becomes the start of the session id (sanitized, shortened to fit
    ``AF_UNIX`` paths). *backend* and *transport* (``tcp`` or ``uds``, default
    ``tcp``) go into the envelope and the record. *command* is recorded for
    ``harness sessions``. *runtime_dir* overrides the runtime dir
    (``$HARNESS_RUNTIME_DIR`` and friends); *bindspace_folder* the folder
    under it that holds bindspaces. *rtvars* adds envelope fields
    (``loglevel``, ``diag_on_hang``, fields unknown to this version, ...);
    they may override the defaults built here, except ``session`` and
    ``bindspace``. *subreaper* makes the owner a child subreaper; only a
    process that reaps its adopted children should ask (see
    `harness.subreaper`). *prune* lets `open` clear stale sessions that left
    nothing behind.

    Attributes that exist once the session is open: `id`, `port`,
    `bindspace`, `rtvars`, `record`, `store`, `runtime_dir` (`id`, `bindspace`
    and `runtime_dir` still answer after `close`). Hooks may set
    `leaks` (a report with a ``leak_count``) and `exit_status`; `close` uses them
    when not given other values.
    """

    def __init__(
        self,
        name: str = "session",
        *,
        backend: str | None = None,
        transport: str | None = None,
        command: Sequence[str] = (),
        runtime_dir: Path | str | None = None,
        bindspace_folder: str = DEFAULT_FOLDER,
        envelope_name: str = RT_VARS_ENV,
        port_range: tuple[int, int] | None = None,
        rtvars: Mapping[str, Any] | None = None,
        socket_name_reserve: int = SOCKET_NAME_RESERVE,
        subreaper: bool = False,
        prune: bool = True,
    ) -> None:
        if transport is not None and transport not in TRANSPORTS:
            msg = f"unknown transport {transport!r}; use one of {', '.join(TRANSPORTS)}"
            raise HarnessError(msg)
        self.name = name
        self.backend = backend
        self.transport = transport
        self.command = list(command)
        self.bindspace_folder = bindspace_folder
        self.envelope_name = envelope_name
        self.port_range = port_range
        self.extra_rtvars = dict(rtvars or {})
        self.socket_name_reserve = socket_name_reserve
        self.subreaper = subreaper
        self.prune = prune
        self.leaks: LeakCount | None = None
        self.exit_status: int | None = None
        self.leak_count: int | None = None
        self._runtime_dir_arg = Path(runtime_dir) if runtime_dir is not None else None
        self._state: Literal["new", "open", "closed"] = "new"
        self._lease: PortLease | None = None
        self._id = ""
        self._bindspace: Path | None = None
        self._runtime_dir: Path | None = None
        self._rtvars: RuntimeVars | None = None
        self._envelope = ""
        self._record: SessionRecord | None = None
        self._store: SessionStore | None = None

    # ------------------------------------------------------------ accessors

    def _opened(self, what: str, *, after_close: bool = False) -> Any:
        if self._state != "open" and not (after_close and self._state == "closed"):
            msg = (
                f"the session {self.name!r} is {self._state}: {what} exists only "
                "while it is open; use `with Session(...) as session:` or call "
                "open() first"
            )
            raise HarnessError(msg)
        return getattr(self, f"_{what}")

    @property
    def is_open(self) -> bool:
        return self._state == "open"

    @property
    def id(self) -> str:
        """The session id, ``<name>-<8 hex>``."""
        return self._opened("id", after_close=True)  # type: ignore[no-any-return]

    @property
    def port(self) -> int:
        """The leased registry port."""
        lease = self._opened("lease")
        return lease.port  # type: ignore[no-any-return]

    @property
    def bindspace(self) -> Path:
        """The session's private socket folder (``XDG_RUNTIME_DIR`` of children)."""
        return self._opened("bindspace", after_close=True)  # type: ignore[no-any-return]

    @property
    def runtime_dir(self) -> Path:
        """The host's runtime dir the session lives in."""
        return self._opened("runtime_dir", after_close=True)  # type: ignore[no-any-return]

    @property
    def rtvars(self) -> RuntimeVars:
        """The envelope, typed."""
        return self._opened("rtvars")  # type: ignore[no-any-return]

    @property
    def record(self) -> SessionRecord:
        """The session's record as last written."""
        return self._opened("record")  # type: ignore[no-any-return]

    @property
    def store(self) -> SessionStore:
        """The record folder of the runtime dir."""
        return self._opened("store")  # type: ignore[no-any-return]

    @property
    def socket_dir(self) -> Path:
        """Where a tractor child binds its Unix sockets: ``<bindspace>/tractor``."""
        return socket_dir(self.bindspace)

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> Session:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def open(self) -> Session:
        """Lease a port, create the bindspace, write the record.

        Raises `HarnessError` when the runtime dir is unsafe, the bindspace
        path is too long for ``AF_UNIX`` sockets, no port can be leased or
        the record cannot be written; nothing of the session is left behind
        then.
        """
        if self._state != "new":
            msg = f"the session {self.name!r} is already {self._state}; make a new one"
            raise HarnessError(msg)
        from harness.ports import lease_port

        rt = self._runtime_dir_arg or resolve_runtime_dir()
        store = SessionStore(rt)
        root = bindspace_root(rt, self.bindspace_folder)
        if self.prune:
            _prune_quietly(rt, self.bindspace_folder)

        # 1. The lease first: the kernel drops its lock if we die from here on.
        lease = lease_port(port_range=self.port_range)
        try:
            # 2. The bindspace: its exclusive mkdir decides the session id.
            session_id, bindspace = self._create_bindspace(root)
            try:
                # 3. The record, atomically; now the session is visible.
                self._lease = lease
                self._id = session_id
                self._bindspace = bindspace
                self._runtime_dir = rt
                self._store = store
                self._build_envelope()
                self._record = self._new_record()
                store.write(self._record)
            except BaseException:
                remove_bindspace(bindspace)
                raise
        except BaseException:
            self._lease = None
            lease.release()
            raise
        if self.subreaper:
            from harness.subreaper import become_subreaper

            become_subreaper()
        self._state = "open"
        log.info(
            "Opened session %s: port %d, bindspace %s.",
            session_id,
            lease.port,
            bindspace,
        )
        return self

    def _create_bindspace(self, root: Path) -> tuple[str, Path]:
        # The id is as long as the AF_UNIX budget allows under this root.
        fixed = len(os.fsencode(os.fspath(root))) + len(APP_FOLDER) + 3
        budget = unix_path_limit() - fixed - self.socket_name_reserve
        max_len = budget if budget >= SUFFIX_LEN + 2 else None
        for _ in range(ID_ATTEMPTS):
            session_id = new_session_id(self.name, max_len=max_len)
            if max_len is None:
                # Too deep for any id: let the check say so with its numbers.
                check_path_room(root / session_id, reserve=self.socket_name_reserve)
            try:
                path = create_bindspace(
                    session_id, root=root, reserve=self.socket_name_reserve
                )
            except FileExistsError:
                log.debug("Session id %s is taken; drawing another.", session_id)
                continue
            return session_id, path
        msg = (
            f"could not find a free session id for {self.name!r} under "
            f"{str(root)!r} in {ID_ATTEMPTS} attempts; remove old folders there "
            "with `harness sessions --prune`"
        )
        raise HarnessError(msg)

    def _build_envelope(self) -> None:
        assert self._bindspace is not None
        assert self._lease is not None
        transport = self.transport or "tcp"
        port = self._lease.port
        registry: tuple[str, int | str]
        if transport == "uds":
            registry = (str(socket_dir(self._bindspace)), f"registry@{port}.sock")
        else:
            registry = ("127.0.0.1", port)
        core: dict[str, Any] = {
            "_registry_addrs": [registry],
            "_enable_tpts": [transport],
            "tpt_proto": transport,
        }
        if self.backend is not None:
            core["spawn_backend"] = self.backend
        plain = {**core, **self.extra_rtvars}
        plain["session"] = self._id
        plain["bindspace"] = str(self._bindspace)
        # encode_rtvars validates the known fields and keeps unknown ones.
        self._envelope = encode_rtvars(plain, name=self.envelope_name)
        self._rtvars = msgspec.convert(
            {k: v for k, v in plain.items() if k in RuntimeVars.__struct_fields__},
            RuntimeVars,
            strict=True,
        )

    def _new_record(self) -> SessionRecord:
        import psutil

        assert self._bindspace is not None
        assert self._runtime_dir is not None
        return SessionRecord(
            id=self._id,
            name=self.name,
            owner_pid=os.getpid(),
            owner_create_time=psutil.Process().create_time(),
            uid=os.getuid(),
            runtime_dir=str(self._runtime_dir),
            bindspace=str(self._bindspace),
            port=self._lease.port if self._lease else None,
            command=self.command,
            backend=self.backend,
            transport=self.transport or "tcp",
            envelope_name=self.envelope_name,
        )

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment for the session's command: *base* plus the session.

        *base* defaults to this process's environment. Adds the envelope,
        ``XDG_RUNTIME_DIR=<bindspace>`` and ``HARNESS_RUNTIME_DIR=<runtime
        dir>``; an envelope inherited in *base* is replaced.
        """
        self._opened("id")
        env = dict(os.environ if base is None else base)
        env.update(bindspace_env(self.bindspace, self.runtime_dir))
        env[self.envelope_name] = self._envelope
        return env

    def update_record(self, **changes: Any) -> None:
        """Change fields of the record and rewrite it atomically.

        Raises `HarnessError` for a field the record does not have.
        """
        record = self._opened("record")
        unknown = set(changes) - set(SessionRecord.__struct_fields__)
        if unknown:
            msg = (
                f"session records have no field {sorted(unknown)[0]!r}; known "
                f"fields: {', '.join(SessionRecord.__struct_fields__)}"
            )
            raise HarnessError(msg)
        self._record = msgspec.structs.replace(record, **changes)
        self.store.write(self._record)

    def close(
        self, *, leaks: LeakCount | None = None, exit_status: int | None = None
    ) -> None:
        """End the session: keep its leftovers if it leaked, else remove all.

        *leaks* (default: `self.leaks`) is the leak report; without one, the
        socket files left in the bindspace count as leaks. With no leak the
        bindspace and the record are removed; with leaks both stay, the
        record marked ``closed_at``, ``exit_status``, ``leak_count``. The
        lease is released either way; `leak_count` tells what was found.
        Closing twice does nothing.
        """
        if self._state != "open":
            self._state = "closed" if self._state == "new" else self._state
            return
        leaks = leaks if leaks is not None else self.leaks
        if exit_status is not None:
            self.exit_status = exit_status
        bindspace = self.bindspace
        try:
            count = (
                _leak_count(leaks) if leaks is not None else _socket_count(bindspace)
            )
            if count == 0:
                kept = remove_bindspace(bindspace)
                count = len(kept)
            self.leak_count = count
            if count:
                self.update_record(
                    closed_at=time.time(),
                    exit_status=self.exit_status,
                    leak_count=count,
                )
                log.warning(
                    "Session %s left %d leak(s); its bindspace %s and its "
                    "record are kept. Next: `harness check %s`.",
                    self.id,
                    count,
                    bindspace,
                    self.id,
                )
            else:
                self.store.remove(self.id)
                log.info("Closed session %s; nothing leaked.", self.id)
        finally:
            if self._lease is not None:
                self._lease.release()
            self._state = "closed"


def _leak_count(report: LeakCount) -> int:
    count = report.leak_count
    if not isinstance(count, int):
        msg = f"a leak report must have an int leak_count, got {count!r}"
        raise TypeError(msg)
    return count


def _socket_count(bindspace: Path) -> int:
    import stat

    count = 0
    for path in bindspace_contents(bindspace):
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                count += 1
    return count


# ---------------------------------------------------------------- pruning


@dataclass(frozen=True)
class PruneAction:
    """What `prune_sessions` did with one stale session or orphan bindspace."""

    session_id: str
    bindspace: Path
    action: Literal["removed", "kept"]
    reason: str
    port: int | None = None


def prune_sessions(
    runtime_dir: Path | None = None,
    *,
    folder: str = DEFAULT_FOLDER,
    grace: float = ORPHAN_GRACE,
) -> list[PruneAction]:
    """Clear stale sessions that left nothing behind; report the rest.

    Temp files of record writers that died before renaming them go first.
    A stale session (owner gone without closing) whose bindspace holds no
    file and none of whose processes still runs loses its bindspace and
    record; its lease already died with the owner. One whose bindspace still
    holds files, or whose processes still run, is kept for the leak check
    and `harness reap`. A bindspace without any record (its owner died while opening) is
    treated the same once it is older than *grace* seconds. Live sessions
    and closed sessions that leaked are never touched.
    """
    rt = runtime_dir if runtime_dir is not None else resolve_runtime_dir()
    store = SessionStore(rt)
    store.remove_dead_writers_temp_files()
    actions: list[PruneAction] = []
    records = store.list()
    for record in records:
        if record.closed_at is not None or owner_alive(record):
            continue
        bindspace = Path(record.bindspace)
        if bindspace.name != record.id or bindspace.parent.parent != rt:
            actions.append(
                PruneAction(
                    record.id,
                    bindspace,
                    "kept",
                    "its record names a bindspace outside this runtime dir",
                    record.port,
                )
            )
            continue
        running = _running_processes(record)
        if running:
            # Its files may be gone, but its processes are not: the record is
            # what `harness reap` needs to find them.
            actions.append(
                PruneAction(
                    record.id,
                    bindspace,
                    "kept",
                    f"{running} of its processes still run; `harness reap "
                    f"{record.id}` ends them",
                    record.port,
                )
            )
            continue
        action = _prune_one(record.id, bindspace, record.port)
        if action.action == "removed":
            store.remove(record.id)
        actions.append(action)

    # Bindspaces whose owner died between mkdir and writing the record.
    now = time.time()
    for bindspace in orphan_bindspaces(rt, records, folder=folder):
        try:
            age = now - os.lstat(bindspace).st_mtime
        except FileNotFoundError:
            continue
        if age >= grace:
            actions.append(_prune_one(bindspace.name, bindspace, None))
    return actions


def orphan_bindspaces(
    runtime_dir: Path,
    records: list[SessionRecord],
    *,
    folder: str = DEFAULT_FOLDER,
) -> list[Path]:
    """Bindspaces under *runtime_dir* that no record in *records* claims.

    Looks in ``<runtime_dir>/<folder>`` and in the folders of the records'
    bindspaces; only folders named like a session id count. A very young
    one may belong to a session that is opening right now.
    """
    known = {record.id for record in records}
    roots = {bindspace_root(runtime_dir, folder)}
    for record in records:
        bindspace = Path(record.bindspace)
        if bindspace.parent.parent == runtime_dir:
            roots.add(bindspace.parent)
    return [
        bindspace
        for root in sorted(roots)
        for bindspace in list_bindspaces(root)
        if bindspace.name not in known and is_session_id(bindspace.name)
    ]


def _unused_stacks_file(path: Path) -> bool:
    """An empty ``<bindspace>/stacks/<pid>.txt``: the harness's own stack-dump
    file of a process that never dumped. It is no evidence of anything; a
    file that holds stacks is kept like any other."""
    from harness.faulthandler_hook import STACKS_DIRNAME

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True
    return (
        path.parent.name == STACKS_DIRNAME
        and stat.S_ISREG(st.st_mode)
        and st.st_size == 0
    )


def _running_processes(record: SessionRecord) -> int:
    """How many live (not zombie) processes the leak check finds for *record*."""
    from harness.leaks import check_leaks

    return sum(1 for p in check_leaks(record).processes if not p.zombie)


def _prune_one(session_id: str, bindspace: Path, port: int | None) -> PruneAction:
    contents = [p for p in bindspace_contents(bindspace) if not _unused_stacks_file(p)]
    if contents:
        return PruneAction(
            session_id,
            bindspace,
            "kept",
            f"its bindspace holds {len(contents)} file(s)",
            port,
        )
    try:
        kept = remove_bindspace(bindspace)
    except HarnessError as exc:
        return PruneAction(session_id, bindspace, "kept", str(exc), port)
    if kept:
        return PruneAction(
            session_id,
            bindspace,
            "kept",
            f"{len(kept)} file(s) appeared in its bindspace while pruning",
            port,
        )
    log.info("Pruned stale session %s (bindspace %s).", session_id, bindspace)
    return PruneAction(session_id, bindspace, "removed", "left nothing behind", port)


def _prune_quietly(rt: Path, folder: str) -> None:
    try:
        prune_sessions(rt, folder=folder)
    except (HarnessError, OSError) as exc:
        log.debug("Skipped pruning stale sessions: %s", exc)
