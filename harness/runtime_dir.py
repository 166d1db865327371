"""Where the harness keeps per-user state, and how it makes private folders.

The runtime dir is, in order: ``$HARNESS_RUNTIME_DIR`` (set by the harness
inside every session, so nested commands still find the host's state),
``$XDG_RUNTIME_DIR``, ``/run/user/<uid>`` when it exists and belongs to the
user, else ``<tmp>/runtime-<uid>`` (the same fallback `platformdirs` uses, so
a runtime that computes its socket folder with `platformdirs` and the harness
agree even as root in a container).

Below it::

    <runtime-dir>/tractor/<session-id>/      a session's bindspace
    <runtime-dir>/harness/sessions/<id>.json a session's record
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Final

from harness.errors import HarnessError

log = logging.getLogger("harness.runtime_dir")

#: Overrides every other choice of runtime dir.
RUNTIME_DIR_ENV: Final = "HARNESS_RUNTIME_DIR"


def _fallback_base() -> Path:
    # macOS's per-user temp dir is ~50 bytes deep, which eats into the
    # 103-byte AF_UNIX limit; /tmp is short and always there.
    if sys.platform == "darwin" and os.path.isdir("/tmp"):
        return Path("/tmp")
    return Path(tempfile.gettempdir())


def runtime_dir(env: dict[str, str] | None = None) -> Path:
    """Return the runtime dir to use, creating the fallback if needed.

    Raises `HarnessError` when the chosen folder is unsafe (a symlink, owned
    by another user, or not a folder), naming it and the fix.
    """
    source = os.environ if env is None else env
    uid = os.getuid()
    for var in (RUNTIME_DIR_ENV, "XDG_RUNTIME_DIR"):
        value = source.get(var)
        if value:
            path = Path(value)
            if not path.is_absolute():
                msg = (
                    f"${var} is {value!r}, which is not an absolute path; "
                    f"set it to an absolute folder or unset it"
                )
                raise HarnessError(msg)
            if not path.exists():
                # A runtime dir that vanished (logged-out user, cleaned
                # container) is recreated only where we may own it.
                ensure_private_dir(path, create_parents=True)
            return _checked(path, var)
    per_user = Path(f"/run/user/{uid}")
    try:
        st = os.lstat(per_user)
    except OSError:
        pass
    else:
        if stat.S_ISDIR(st.st_mode) and st.st_uid == uid:
            return per_user
    fallback = _fallback_base() / f"runtime-{uid}"
    log.debug("No XDG_RUNTIME_DIR nor /run/user/%s; using %s.", uid, fallback)
    return ensure_private_dir(fallback)


def _checked(path: Path, var: str) -> Path:
    try:
        st = os.lstat(path)
    except OSError as exc:
        msg = f"${var} points to {str(path)!r}, which cannot be read: {exc}"
        raise HarnessError(msg) from None
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(path)
        msg = (
            f"${var} {str(path)!r} is a symlink (to {target!r}); point ${var} "
            "at the real folder"
        )
        raise HarnessError(msg)
    if not stat.S_ISDIR(st.st_mode):
        msg = f"${var} {str(path)!r} is not a folder; point it at a folder"
        raise HarnessError(msg)
    if st.st_uid != os.getuid():
        msg = (
            f"${var} {str(path)!r} belongs to uid {st.st_uid}, not to you "
            f"(uid {os.getuid()}); point ${var} at a folder of your own"
        )
        raise HarnessError(msg)
    return path


def ensure_private_dir(path: Path, *, create_parents: bool = False) -> Path:
    """Create *path* as a ``0700`` folder of the current user, or check it.

    The folder is opened with ``O_NOFOLLOW`` and checked through the open
    descriptor, so a symlink planted at *path* (in a shared ``/tmp``, say)
    between the check and the use is refused rather than followed. A folder
    that exists and is ours but too open is narrowed to ``0700``. Raises
    `HarnessError` for a symlink, a non-folder, or another user's folder.
    """
    if create_parents:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        os.mkdir(path, 0o700)
        log.debug("Created private folder %s.", path)
    except FileExistsError:
        pass
    except OSError as exc:
        msg = f"cannot create the folder {str(path)!r}: {exc.strerror}"
        raise HarnessError(_with_fix(msg, exc)) from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        if os.path.islink(path):
            msg = (
                f"{str(path)!r} is a symlink (to {os.readlink(path)!r}); the "
                "harness never follows links in its folders. Remove the link "
                "if it is not yours to keep, or set $HARNESS_RUNTIME_DIR to "
                "another folder"
            )
        else:
            msg = f"{str(path)!r} is not a usable folder: {exc.strerror}"
        raise HarnessError(msg) from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid():
            msg = (
                f"{str(path)!r} belongs to uid {st.st_uid}, not to you (uid "
                f"{os.getuid()}); the harness keeps sockets only in folders "
                "of your own. Set $HARNESS_RUNTIME_DIR to a folder you own"
            )
            raise HarnessError(msg)
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return path


def _with_fix(msg: str, exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return msg + "; the file system is full: free space or set $HARNESS_RUNTIME_DIR"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return msg + "; set $HARNESS_RUNTIME_DIR to a writable folder of your own"
    return msg


def harness_state_dir(root: Path | None = None) -> Path:
    """``<runtime-dir>/harness``, created private on first use."""
    base = root if root is not None else runtime_dir()
    return ensure_private_dir(base / "harness")
