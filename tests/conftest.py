"""Shared fixtures: every test runs against its own short runtime dir.

The harness keeps its state (session records, bindspaces) under the runtime
dir. Pointing ``$HARNESS_RUNTIME_DIR`` at a fresh folder per test keeps tests
from seeing each other's sessions, or the developer's real ones. The folder
sits directly under ``/tmp`` so that socket paths inside it stay far below the
``AF_UNIX`` limit (pytest's own ``tmp_path`` is 60+ bytes deep).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from leak_sessions import SessionFactory


@pytest.fixture(autouse=True)
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private, short runtime dir, set as ``$HARNESS_RUNTIME_DIR``."""
    path = Path(tempfile.mkdtemp(prefix="hrt-", dir="/tmp"))
    monkeypatch.setenv("HARNESS_RUNTIME_DIR", str(path))
    # The envelope of the run's own session (the pytest plugin's, or nox's)
    # names a session in another runtime dir: a test starts without it.
    # tests/integration keeps it by overriding this fixture.
    monkeypatch.delenv("_TRACTOR_RT_VARS", raising=False)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def python() -> str:
    """The interpreter running the tests, for child processes."""
    return sys.executable


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drop any envelope inherited from an outer harness session."""
    for name in list(os.environ):
        if name == "_TRACTOR_RT_VARS":
            monkeypatch.delenv(name)


@pytest.fixture
def sessions(runtime_dir: Path) -> Iterator[SessionFactory]:
    """Hand-built sessions (records, bindspaces, real processes) in the
    test's runtime dir; every process a test starts is killed afterwards."""
    factory = SessionFactory(runtime_dir)
    yield factory
    factory.cleanup()
