"""The session's backend and transport, end to end with real children."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import spawning
import tiny_registry

from harness.rtvars import RT_VARS_ENV, RuntimeVars, load_rtvars


def test_envelope_agrees_with_the_flags(
    rtvars: RuntimeVars, spawn_backend: str, tpt_proto: str, session_id: str
) -> None:
    assert spawn_backend in spawning.BACKENDS
    assert rtvars.spawn_backend == spawn_backend
    assert rtvars.tpt_proto == tpt_proto
    assert tpt_proto in rtvars._enable_tpts
    assert rtvars.session == session_id
    # What this process holds is what a child will read.
    assert load_rtvars() == rtvars


def test_registry_address_fits_the_transport(
    reg_addr: tuple[str, int | str], tpt_proto: str, bindspace: Path
) -> None:
    if tpt_proto == "tcp":
        host, port = reg_addr
        assert host == "127.0.0.1"
        assert isinstance(port, int)
        assert 1024 < port < 65536
    else:
        path = Path(tiny_registry.unix_path(reg_addr))
        assert path.is_relative_to(bindspace)
        assert len(os.fsencode(path)) < 108


def test_registry_listens_where_the_envelope_says(
    registry: tiny_registry.Registry,
    reg_addr: tuple[str, int | str],
    tpt_proto: str,
    bindspace: Path,
) -> None:
    if tpt_proto == "uds":
        path = tiny_registry.unix_path(reg_addr)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        family, target = socket.AF_UNIX, path
    else:
        family, target = socket.AF_INET, (str(reg_addr[0]), int(reg_addr[1]))
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(target)
    assert tiny_registry.request({"op": "list"})["ok"]


def test_children_of_the_backend_join_the_registry(
    registry: tiny_registry.Registry, spawn_backend: str
) -> None:
    names = [f"{spawn_backend}-child-{i}" for i in range(2)]
    spawning.spawn_children(spawn_backend, names)
    envelope = os.environ[RT_VARS_ENV]
    for name in names:
        entry = registry.entry(name)
        assert entry["pid"] != os.getpid()
        assert entry["envelope"] == envelope


def test_grandchildren_see_the_same_envelope(
    registry: tiny_registry.Registry, spawn_backend: str
) -> None:
    name = f"{spawn_backend}-parent"
    spawning.spawn_children(
        spawn_backend, [name], target=tiny_registry.join_with_grandchild
    )
    envelope = os.environ[RT_VARS_ENV]
    assert registry.entry(name)["envelope"] == envelope
    assert registry.entry(f"{name}.grandchild")["envelope"] == envelope


def test_plain_script_joins_from_the_envelope_alone(
    registry: tiny_registry.Registry, tpt_proto: str
) -> None:
    # As tractor's tests/devx scripts are started: a plain subprocess that
    # is told nothing, not even the registry address.
    done = subprocess.run(
        [sys.executable, spawning.CHILD_SCRIPT, f"script-{tpt_proto}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    entry = registry.entry(f"script-{tpt_proto}")
    assert entry["envelope"] == os.environ[RT_VARS_ENV]


def test_children_without_the_envelope_cannot_find_the_registry(
    registry: tiny_registry.Registry,
) -> None:
    # The control: the envelope really is what carries the address.
    env = {k: v for k, v in os.environ.items() if k != RT_VARS_ENV}
    done = subprocess.run(
        [sys.executable, spawning.CHILD_SCRIPT, "no-envelope"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "not set" in done.stderr
    with pytest.raises(LookupError):
        registry.entry("no-envelope")
