"""Exit statuses of ``harness`` commands, chosen clear of pytest's 0-5.

A command run by ``harness exec`` passes its own status through; the statuses
below are the harness's own verdicts and are documented in the README.
"""

from __future__ import annotations

from typing import Final

OK: Final = 0
#: ``argparse`` usage errors.
USAGE: Final = 2
#: The harness itself could not do its job (bad runtime dir, namespaces
#: refused, ...). The message on stderr says why.
HARNESS_ERROR: Final = 85
#: The command passed (or its status was kept) but the session leaked and the
#: leak mode was ``fail``.
LEAKED: Final = 86
#: A hang limit (wall clock or silence) was hit; the hang report was written
#: and the session's processes were reaped.
HUNG: Final = 87
