"""Write a file so that readers see the old content or the new, never half.

The data goes to a temporary file beside the target (same folder, so the
same file system), is flushed with ``fsync``, and is renamed over the target;
a rename within one file system is atomic. A writer killed half-way leaves
at most the temporary file, named ``.<name>.<pid>.tmp``, never a torn target.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_atomic(
    path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644
) -> Path:
    """Replace *path* with *data* atomically; return the absolute path.

    Missing parent folders are created. The temporary file is opened with
    ``O_NOFOLLOW``, so a symlink planted in its place is refused, not
    followed. Raises `OSError` (after removing the temporary file) when the
    file cannot be written; callers turn it into a message for the user.
    """
    final = Path(path).absolute()
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # Flush the folder too, so the rename itself survives a crash of the host.
    with contextlib.suppress(OSError):
        dfd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return final
