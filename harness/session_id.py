"""Session ids: ``<name>-<8 hex>``, safe as a folder name and a socket path.

The name part is what the user called the session (a nox session name such
as ``tests-trio-tcp``), reduced to ``[A-Za-z0-9_.-]`` and shortened to fit a
length budget; the suffix is 32 random bits from `os.urandom` (the source
`secrets` uses, without the import cost of its hashing modules). Uniqueness
is not promised by the randomness alone: whoever creates the session makes its
bindspace with an exclusive ``mkdir`` and draws a new suffix when the folder
already exists (see `harness.bindspace.create_bindspace`).
"""

from __future__ import annotations

import os
import re
from typing import Final

#: Characters of the random suffix (hex digits).
SUFFIX_LEN: Final = 8

#: Longest name part kept when nothing tighter is asked for.
MAX_NAME_LEN: Final = 40

#: The name used when the given one has no usable character.
DEFAULT_NAME: Final = "session"

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_SESSION_ID = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)-(?P<suffix>[0-9a-f]{8})$")


def sanitize_name(name: str, *, max_len: int = MAX_NAME_LEN) -> str:
    """*name* reduced to ``[A-Za-z0-9_.-]``, at most *max_len* characters.

    Runs of other characters become one ``-``; leading dots and dashes go
    (no hidden folders, nothing that reads as a command-line option). A name
    left empty becomes ``session``; one that is too long keeps its start.
    """
    cleaned = _UNSAFE.sub("-", name).lstrip(".-")
    cleaned = cleaned[: max(max_len, 1)].rstrip(".-")
    return cleaned or DEFAULT_NAME[: max(max_len, 1)]


def new_session_id(name: str, *, max_len: int | None = None) -> str:
    """A fresh id ``<sanitized name>-<8 random hex digits>``.

    *max_len* bounds the whole id in characters (e.g. to keep a socket path
    under the ``AF_UNIX`` limit); the name is shortened to fit, down to one
    character.
    """
    budget = MAX_NAME_LEN
    if max_len is not None:
        budget = min(budget, max_len - SUFFIX_LEN - 1)
    return f"{sanitize_name(name, max_len=max(budget, 1))}-{random_suffix()}"


def is_session_id(text: str) -> bool:
    """Whether *text* has the shape of a session id."""
    return _SESSION_ID.match(text) is not None


def random_suffix() -> str:
    """`SUFFIX_LEN` random hex digits."""
    return os.urandom(SUFFIX_LEN // 2).hex()
