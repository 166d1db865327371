"""The integration suite: runs once per cell of the matrix.

Run it as ``nox -s tests-<backend>-<transport>``, or with plain ``pytest
tests/integration [--spawn-backend=B] [--tpt-proto=T]``: either way the
harness's pytest plugin provides the session (inherited from ``harness
exec``, or opened for the run) and its fixtures.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import spawning
import tiny_registry

from harness.rtvars import RuntimeVars


@pytest.fixture(autouse=True)
def runtime_dir() -> Path:
    """Overrides tests/conftest.py's private runtime dir: the integration
    tests run in the session of the whole run, envelope and all."""
    return Path(os.environ.get("HARNESS_RUNTIME_DIR", "/nonexistent"))


@pytest.fixture(scope="session")
def registry(
    rtvars: RuntimeVars, reg_addr: tuple[str, int | str], tpt_proto: str
) -> Iterator[tiny_registry.Registry]:
    """A registry served on the session's registry address and transport."""
    with tiny_registry.serve(reg_addr, tpt_proto) as served:
        yield served


@pytest.fixture(scope="session", autouse=True)
def _stop_multiprocessing_helpers() -> Iterator[None]:
    yield
    spawning.stop_helpers()
