"""The exceptions the harness raises on purpose.

Every error the harness means a user to read derives from `HarnessError`; the
CLI prints its message without a traceback and exits with
`exit_codes.HARNESS_ERROR`. Messages state the problem, the offending value
with ``!r`` and the fix.
"""

from __future__ import annotations


class HarnessError(Exception):
    """A problem the user can fix; the message says how."""


class RtVarsError(HarnessError, ValueError):
    """The envelope is missing, malformed, too large or of the wrong shape."""


class RtVarsMissing(RtVarsError):
    """The envelope's environment variable is not set at all."""
