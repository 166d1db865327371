"""The plugin's fixtures that share their names with tractor's own.

tractor's pytest plugin (and maybe a project's) already serves
``reg_addr``, ``spawn_backend`` and ``tpt_proto``, with side effects its
suite relies on. Between two plugins the one registered last would win, and
the harness's entry point registers after a ``-p`` plugin; so these fixtures
live here and `harness.pytest_plugin` registers this module only when no
other plugin provides any of the three. A project's conftest.py overrides
them either way, as conftest fixtures always do.
"""

from __future__ import annotations

import pytest

from harness.pytest_plugin import _state
from harness.rtvars import RuntimeVars

#: The fixture names this module serves.
NAMES = ("reg_addr", "spawn_backend", "tpt_proto")


@pytest.fixture(scope="session")
def reg_addr(rtvars: RuntimeVars, session_id: str) -> tuple[str, int | str]:
    """The session's registry address: ``(host, port)`` for tcp, ``(folder,
    file name)`` for uds."""
    if not rtvars._registry_addrs:
        pytest.fail(
            f"the envelope of session {session_id!r} has no registry address",
            pytrace=False,
        )
    host, port = rtvars._registry_addrs[0]
    return (host, port)


@pytest.fixture(scope="session")
def spawn_backend(request: pytest.FixtureRequest) -> str:
    """The spawn backend: ``--spawn-backend``, else the envelope's, else trio."""
    return _state(request).values["spawn_backend"]


@pytest.fixture(scope="session")
def tpt_proto(request: pytest.FixtureRequest) -> str:
    """The transport: ``--tpt-proto``, else the envelope's, else tcp."""
    return _state(request).values["tpt_proto"]
