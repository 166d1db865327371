"""The plugin beside a plugin shaped like tractor's own (``-p`` in addopts).

tractor's plugin defines ``--spawn-backend``, ``--tpt-proto`` with
``nargs='+'`` (a list) and ``--ll``/``--loglevel``, and serves the fixtures
``reg_addr``, ``spawn_backend`` and ``tpt_proto`` with side effects its suite
relies on. The stand-in below is written from those facts alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

STAND_IN = """
import pytest

def pytest_addoption(parser):
    parser.addoption("--spawn-backend", dest="spawn_backend", default="trio")
    parser.addoption("--tpt-proto", nargs="+", dest="tpt_protos", default=["tcp"])
    parser.addoption("--ll", "--loglevel", dest="loglevel", default=None)

@pytest.fixture(scope="session")
def reg_addr():
    return ("from-target", 4242)

@pytest.fixture(scope="session")
def tpt_proto(request):
    return request.config.option.tpt_protos[0]

@pytest.fixture(scope="session")
def spawn_backend(request):
    return request.config.option.spawn_backend
"""

PROBE = """
import json, os
from pathlib import Path

def test_probe(reg_addr, tpt_proto, spawn_backend, rtvars, bindspace):
    Path(os.environ["PROBE_OUT"]).write_text(json.dumps({
        "reg_addr": list(reg_addr),
        "tpt_proto": tpt_proto,
        "spawn_backend": spawn_backend,
        "envelope_tpt": rtvars.tpt_proto,
        "envelope_backend": rtvars.spawn_backend,
        "bindspace": str(bindspace),
        "xdg": os.environ.get("XDG_RUNTIME_DIR"),
    }))
"""


@pytest.fixture
def target(tmp_path: Path) -> Path:
    (tmp_path / "targetplug.py").write_text(STAND_IN)
    (tmp_path / "test_probe.py").write_text(PROBE)
    (tmp_path / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [tool.pytest.ini_options]
            addopts = "-p targetplug"
            """
        )
    )
    return tmp_path


def _run(target: Path, *args: str, env_extra: dict[str, str] | None = None) -> dict:
    import os

    out = target / "probe.json"
    env = {k: v for k, v in os.environ.items() if k != "_TRACTOR_RT_VARS"}
    env.pop("XDG_RUNTIME_DIR", None)
    env.update(PYTHONPATH=str(target), PROBE_OUT=str(out), **(env_extra or {}))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        check=False,
        cwd=target,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def test_target_fixtures_win_and_list_flags_reach_the_envelope(target: Path) -> None:
    seen = _run(target, "--tpt-proto", "uds", "--spawn-backend", "mp_spawn")
    # The target's own fixtures are served, not the harness's.
    assert seen["reg_addr"] == ["from-target", 4242]
    assert seen["tpt_proto"] == "uds"
    assert seen["spawn_backend"] == "mp_spawn"
    # Its list-valued --tpt-proto reached the envelope as one transport.
    assert seen["envelope_tpt"] == "uds"
    assert seen["envelope_backend"] == "mp_spawn"


def test_standalone_session_leaves_xdg_runtime_dir_alone(target: Path) -> None:
    seen = _run(target)
    assert seen["bindspace"]
    # The target computed its socket folder at import; the run must not
    # move it under its feet.
    assert seen["xdg"] is None


def test_without_the_target_plugin_the_harness_serves_the_fixtures(
    target: Path,
) -> None:
    seen = _run(target, "-o", "addopts=", "--tpt-proto", "uds")
    host, name = seen["reg_addr"]
    assert host.startswith(seen["bindspace"])
    assert name.startswith("registry@")
    assert seen["tpt_proto"] == "uds"
