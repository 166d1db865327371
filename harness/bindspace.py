"""Bindspaces: the private folder of one session for Unix-domain sockets.

A session's bindspace is ``<runtime-dir>/<folder>/<session-id>/`` (folder
``tractor`` unless configured). It is created with an exclusive ``mkdir``,
so two sessions can never share one: the ``mkdir`` is what decides that a
session id is free. It is mode ``0700`` and owned by the user, and nothing on
the way to it may be a symlink or another user's folder.

A runtime that finds its socket folder with ``platformdirs`` (tractor uses
``platformdirs.user_runtime_dir('tractor')``, i.e. ``$XDG_RUNTIME_DIR/tractor``)
is steered into the bindspace by the environment alone: `bindspace_env` sets
``XDG_RUNTIME_DIR=<bindspace>``, so its sockets land in
``<bindspace>/tractor/`` (`socket_dir`), and ``HARNESS_RUNTIME_DIR=<the real
runtime dir>``, so a harness command run inside the session still sees the
host's sessions and leases.

``AF_UNIX`` socket paths are short: ``sun_path`` holds 108 bytes on Linux
(107 and the terminating NUL) and 104 on macOS. A bindspace is refused up
front when it leaves less than a reserve (40 bytes by default) for socket
names in `socket_dir`, with the numbers and the fix in the message, rather
than failing later, deep inside a runtime's ``bind()``.

Removal (`remove_bindspace`) walks the tree through directory descriptors and
``lstat``, never follows a symlink (a link is unlinked, its target left
alone) and leaves in place anything that belongs to another user.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from harness.errors import HarnessError
from harness.runtime_dir import RUNTIME_DIR_ENV, ensure_private_dir, runtime_dir

log = logging.getLogger("harness.bindspace")

#: The folder under the runtime dir that holds the bindspaces.
DEFAULT_FOLDER: Final = "tractor"

#: The sub-folder a ``platformdirs`` user creates in ``$XDG_RUNTIME_DIR``:
#: tractor calls ``user_runtime_dir('tractor')``.
APP_FOLDER: Final = "tractor"

#: Bytes kept free for a socket's file name in `socket_dir`. tractor names
#: its sockets ``<actor-name>@<pid>.sock``; 40 bytes fit a 24-byte name.
SOCKET_NAME_RESERVE: Final = 40


def unix_path_limit() -> int:
    """The longest ``AF_UNIX`` path in bytes on this platform, NUL excluded.

    107 on Linux, 103 on macOS and the BSDs.
    """
    return 107 if sys.platform.startswith("linux") else 103


def max_socket_name(folder: Path | str) -> int:
    """The longest socket file name, in bytes, that fits in *folder*.

    Pass the folder the socket will be created in: for a tractor child that
    is `socket_dir` of the bindspace, not the bindspace itself. The result is
    negative when even the folder is too deep.
    """
    return unix_path_limit() - len(os.fsencode(os.fspath(folder))) - 1


def socket_dir(bindspace: Path, app: str = APP_FOLDER) -> Path:
    """Where a ``platformdirs`` user named *app* puts its sockets.

    With ``XDG_RUNTIME_DIR=<bindspace>`` that is ``<bindspace>/<app>``.
    """
    return bindspace / app


def bindspace_root(root: Path | None = None, folder: str = DEFAULT_FOLDER) -> Path:
    """``<runtime-dir>/<folder>``, created private and checked.

    Raises `HarnessError` when it, or the runtime dir, is a symlink or
    belongs to another user.
    """
    _check_folder_name(folder)
    base = root if root is not None else runtime_dir()
    return ensure_private_dir(base / folder)


def _check_folder_name(folder: str) -> None:
    if not folder or "/" in folder or folder in (".", ".."):
        msg = (
            f"the bindspace folder must be one plain folder name, got {folder!r}; "
            f"use e.g. {DEFAULT_FOLDER!r}"
        )
        raise HarnessError(msg)


def check_path_room(
    bindspace: Path, *, reserve: int = SOCKET_NAME_RESERVE, app: str = APP_FOLDER
) -> None:
    """Refuse a bindspace whose socket folder leaves under *reserve* bytes.

    The error gives the path, its length, the platform limit and the
    reserve, and tells the user to choose a shorter runtime dir.
    """
    sockets = socket_dir(bindspace, app)
    room = max_socket_name(sockets)
    if room >= reserve:
        return
    length = len(os.fsencode(os.fspath(sockets)))
    msg = (
        f"the socket folder {str(sockets)!r} is {length} bytes long; with "
        f"{reserve} bytes reserved for socket names it exceeds the AF_UNIX "
        f"limit of {unix_path_limit()} bytes by {reserve - room} bytes. "
        f"Set ${RUNTIME_DIR_ENV} to a shorter folder (e.g. "
        f"/tmp/h-{os.getuid()}), or choose a shorter session name"
    )
    raise HarnessError(msg)


def create_bindspace(
    session_id: str,
    *,
    root: Path,
    reserve: int = SOCKET_NAME_RESERVE,
    app: str = APP_FOLDER,
) -> Path:
    """Create the bindspace *root*/*session_id* and its socket folder.

    *root* is a checked `bindspace_root`. The session folder is made with an
    exclusive ``mkdir`` relative to a descriptor of *root* opened with
    ``O_NOFOLLOW``, so a symlink swapped in for *root* after it was checked
    is not followed. Raises `FileExistsError` when the folder exists (the
    id is taken: pick another), `HarnessError` when the path is too long
    for ``AF_UNIX`` sockets or cannot be created.
    """
    path = root / session_id
    check_path_room(path, reserve=reserve, app=app)
    log.debug("Creating bindspace %s.", path)
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        msg = (
            f"cannot open the bindspace root {str(root)!r}: {exc.strerror}; "
            f"set ${RUNTIME_DIR_ENV} to a folder of your own"
        )
        raise HarnessError(msg) from None
    try:
        try:
            os.mkdir(session_id, 0o700, dir_fd=root_fd)
        except FileExistsError:
            raise
        except OSError as exc:
            msg = f"cannot create the bindspace {str(path)!r}: {exc.strerror}"
            if exc.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES):
                msg += f"; set ${RUNTIME_DIR_ENV} to a writable folder of your own"
            raise HarnessError(msg) from None
        fd = os.open(
            session_id, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root_fd
        )
        try:
            # The umask may have narrowed the mode further; 0700 is the contract.
            os.fchmod(fd, 0o700)
            # Pre-create the runtime's socket folder so a registry address in
            # it is valid before the first process starts.
            os.mkdir(app, 0o700, dir_fd=fd)
        finally:
            os.close(fd)
    finally:
        os.close(root_fd)
    log.debug("Created bindspace %s.", path)
    return path


def bindspace_env(bindspace: Path, real_runtime_dir: Path) -> dict[str, str]:
    """The variables that send a session's sockets into *bindspace*.

    ``XDG_RUNTIME_DIR`` points the session's processes at the bindspace;
    ``HARNESS_RUNTIME_DIR`` keeps the host's runtime dir visible to harness
    commands run inside the session.
    """
    return {
        "XDG_RUNTIME_DIR": str(bindspace),
        RUNTIME_DIR_ENV: str(real_runtime_dir),
    }


def list_bindspaces(root: Path) -> list[Path]:
    """The session folders under a bindspace root, by name; symlinks skipped."""
    found = []
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                found.append(Path(entry.path))
    return sorted(found)


def bindspace_contents(bindspace: Path) -> list[Path]:
    """Every file, link or socket below *bindspace* (folders are not listed).

    Empty folders are not content: a bindspace that holds only its empty
    socket folder "holds nothing". Symlinks are listed, never followed. A
    missing bindspace holds nothing.
    """
    return [path for path, _ in _walk_files(bindspace)]


def _walk_files(top: Path) -> Iterator[tuple[Path, os.stat_result]]:
    try:
        entries = list(os.scandir(top))
    except (FileNotFoundError, NotADirectoryError):
        return
    except PermissionError:
        yield top, os.lstat(top)
        return
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode):
            yield from _walk_files(Path(entry.path))
        else:
            yield Path(entry.path), st


def remove_bindspace(bindspace: Path) -> list[Path]:
    """Delete *bindspace* and what is in it; return what had to be kept.

    Only entries owned by the current user are deleted. Links are removed
    as links (their targets are untouched); folders are entered through a
    descriptor opened with ``O_NOFOLLOW`` and checked to be the entry that
    was listed, so a folder swapped for a link mid-walk is not followed.
    Anything kept (another user's file, a folder that changed under us) is
    returned, and the folders above it stay. A missing bindspace is fine.
    Raises `HarnessError` when *bindspace* itself is a symlink or not ours.
    """
    parent, name = bindspace.parent, bindspace.name
    try:
        parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return []
    except OSError as exc:
        msg = (
            f"cannot open {str(parent)!r} to remove the bindspace "
            f"{str(bindspace)!r}: {exc.strerror}"
        )
        raise HarnessError(msg) from None
    try:
        try:
            st = os.lstat(name, dir_fd=parent_fd)
        except FileNotFoundError:
            return []
        if not stat.S_ISDIR(st.st_mode):
            msg = (
                f"{str(bindspace)!r} is not a folder (a symlink or a file); the "
                "harness removes only bindspace folders it created. Remove it "
                "by hand if it is not someone else's"
            )
            raise HarnessError(msg)
        if st.st_uid != os.getuid():
            msg = (
                f"the bindspace {str(bindspace)!r} belongs to uid {st.st_uid}, "
                f"not to you (uid {os.getuid()}); it is left alone"
            )
            raise HarnessError(msg)
        kept: list[Path] = []
        _remove_tree(parent_fd, name, bindspace, st, kept)
    finally:
        os.close(parent_fd)
    if kept:
        log.info("Kept %d entries of bindspace %s.", len(kept), bindspace)
    else:
        log.debug("Removed bindspace %s.", bindspace)
    return kept


def _remove_tree(
    parent_fd: int, name: str, path: Path, listed: os.stat_result, kept: list[Path]
) -> None:
    """Remove folder *name* in *parent_fd*; append what stays to *kept*."""
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd
        )
    except FileNotFoundError:
        return
    except OSError:
        kept.append(path)
        return
    try:
        opened = os.fstat(fd)
        # The entry may have been replaced between lstat and open.
        if (opened.st_dev, opened.st_ino) != (listed.st_dev, listed.st_ino):
            kept.append(path)
            return
        before = len(kept)
        for entry in list(os.scandir(fd)):
            child = path / entry.name
            try:
                st = os.lstat(entry.name, dir_fd=fd)
            except FileNotFoundError:
                continue
            if st.st_uid != os.getuid():
                kept.append(child)
                continue
            if stat.S_ISDIR(st.st_mode):
                _remove_tree(fd, entry.name, child, st, kept)
                continue
            try:
                os.unlink(entry.name, dir_fd=fd)
            except FileNotFoundError:
                pass
            except OSError:
                kept.append(child)
        if len(kept) > before:
            return
    finally:
        os.close(fd)
    try:
        os.rmdir(name, dir_fd=parent_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        # Something appeared while we walked (a process still binding):
        # leave it, and say so.
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            kept.append(path)
        else:
            raise
