"""Tests of harness.nox_sessions, through real nox runs in temp projects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.config import config_from_table
from harness.matrix import Matrix
from harness.nox_sessions import (
    LOCK_SUFFIX,
    MARKER,
    build_command,
    build_exec_args,
    make_run_dir,
    venv_lock,
)

BIN = Path(sys.executable).parent
NOX = str(BIN / "nox")

NOXFILE = """\
import harness.nox_sessions

harness.nox_sessions.register()
"""


def make_project(folder: Path, table: str) -> Path:
    (folder / "pyproject.toml").write_text(f"[tool.harness]\n{table}")
    (folder / "noxfile.py").write_text(NOXFILE)
    return folder


def nox(
    project: Path, *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [NOX, "--no-color", *args],
        cwd=project,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _env() -> dict[str, str]:
    # This venv's bin first, so that `pytest` resolves under --no-venv.
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("CI", None)
    env.pop("_TRACTOR_RT_VARS", None)
    return env


# ------------------------------------------------------------ pure parts


def test_command_template_flags_posargs_and_junit(tmp_path: Path) -> None:
    config = config_from_table(
        {"command": "pytest tests/it {posargs} -p tractor._testing.pytest"},
        source="test",
    )
    cell = Matrix(config).cell("tests-mp_spawn-uds")
    words = build_command(
        config,
        cell,
        python=None,
        session_name="tests-mp_spawn-uds",
        posargs=["-x", "-k", "registrar and not slow"],
        run_dir=tmp_path,
    )
    assert words == [
        "pytest",
        "tests/it",
        "-x",
        "-k",
        "registrar and not slow",
        "-p",
        "tractor._testing.pytest",
        "--spawn-backend=mp_spawn",
        "--tpt-proto=uds",
        f"--junitxml={tmp_path / 'junit.xml'}",
    ]


def test_exec_args_carry_the_session_settings(tmp_path: Path) -> None:
    config = config_from_table(
        {"isolate": "net", "timeout": 90, "silence": 7.5, "bindspace-name": "rt"},
        source="test",
    )
    cell = Matrix(config).cell("tests-trio-tcp")
    args = build_exec_args(
        config, cell, session_name="tests-trio-tcp", leaks="fail", run_dir=tmp_path
    )
    assert args == [
        "exec",
        "--name",
        "tests-trio-tcp",
        "--backend",
        "trio",
        "--transport",
        "tcp",
        "--bindspace-folder",
        "rt",
        "--leaks",
        "fail",
        "--report",
        str(tmp_path / "leaks.json"),
        "--isolate",
        "net",
        "--timeout",
        "90",
        "--silence",
        "7.5",
    ]


def test_run_dirs_are_unique(tmp_path: Path) -> None:
    first = make_run_dir(tmp_path / "tests-trio-tcp")
    second = make_run_dir(tmp_path / "tests-trio-tcp")
    assert first != second
    assert first.is_dir()
    assert second.is_dir()


# ------------------------------------------------------------ the venv lock

HOLDER = """
import sys, time
from pathlib import Path
from harness.nox_sessions import MARKER, _write_marker, venv_lock

location, spec, ready, done = Path(sys.argv[1]), {"v": sys.argv[2]}, *sys.argv[3:5]

def build(reuse_ok):
    (location / "bin").mkdir(parents=True, exist_ok=True)
    (location / "bin" / "python").write_text("")
    _write_marker(location / MARKER, spec)

with venv_lock(location, spec, reuse=False, build=build):
    Path(ready).write_text("in use")
    time.sleep(1.5)
    Path(done).write_text("finished")
"""


def _holder(tmp_path: Path, spec: str) -> tuple[subprocess.Popen[str], Path, Path]:
    ready, done = tmp_path / "ready", tmp_path / "done"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            HOLDER,
            str(tmp_path / "venv"),
            spec,
            str(ready),
            str(done),
        ],
        text=True,
    )
    for _ in range(600):
        if ready.exists() or proc.poll() is not None:
            break
        time.sleep(0.05)
    if not ready.exists():
        proc.kill()
        proc.wait()
        pytest.fail("the holder never took the lock")
    return proc, ready, done


def test_venv_in_use_with_another_spec_is_rebuilt_only_after_its_user_ends(
    tmp_path: Path,
) -> None:
    proc, _ready, done = _holder(tmp_path, "old")
    built: list[bool] = []

    def build(reuse_ok: bool) -> None:
        # The other run must have finished before anything is rebuilt.
        assert done.exists()
        built.append(reuse_ok)
        (tmp_path / "venv" / MARKER).write_text(
            json.dumps({"spec": {"v": "new"}, "created_at": time.time()})
        )

    with venv_lock(tmp_path / "venv", {"v": "new"}, reuse=False, build=build):
        pass
    assert proc.wait(30) == 0
    assert built == [False]
    assert (tmp_path / f"venv{LOCK_SUFFIX}").exists()


def test_venv_in_use_with_the_same_spec_is_shared(tmp_path: Path) -> None:
    proc, _ready, done = _holder(tmp_path, "same")

    def build(reuse_ok: bool) -> None:
        pytest.fail("a virtualenv in use with the same spec must not be rebuilt")

    with venv_lock(tmp_path / "venv", {"v": "same"}, reuse=False, build=build):
        # Shared while the other run still uses it.
        assert not done.exists()
    assert proc.wait(30) == 0


# ------------------------------------------------------------ real nox runs


def test_nox_sessions_equal_harness_matrix_equal_config(tmp_path: Path) -> None:
    project = make_project(
        tmp_path,
        'backends = ["trio", "mp_spawn"]\npythons = ["3.11", "3.13"]\n'
        'exclude = [{transport = "uds", python = "3.11"}]\n',
    )
    listed = nox(project, "-l", "--json", "-t", "tests")
    assert listed.returncode == 0, listed.stderr
    sessions = json.loads(listed.stdout)
    matrix_out = subprocess.run(
        [sys.executable, "-m", "harness", "matrix", "--json"],
        cwd=project,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    github = json.loads(matrix_out.stdout)["include"]
    expected = Matrix.load(project)

    assert [s["session"] for s in sessions] == [j["session"] for j in github]
    assert [s["session"] for s in sessions] == expected.names()
    assert [s["tags"] for s in sessions] == [j["tags"] for j in github]
    assert [s["python"] for s in sessions] == [j["python"] for j in github]
    assert "tests-trio-uds-3.13" in expected.names()
    assert "tests-trio-uds-3.11" not in expected.names()

    # Selecting by a tag picks that cell's sessions only.
    listed = nox(project, "-l", "--json", "-t", "mp_spawn")
    assert {s["session"] for s in json.loads(listed.stdout)} == {
        "tests-mp_spawn-tcp-3.11",
        "tests-mp_spawn-tcp-3.13",
        "tests-mp_spawn-uds-3.13",
    }


TARGET_CONFTEST = """\
import json, os

def pytest_addoption(parser):
    parser.addoption("--spawn-backend", action="store", dest="spawn_backend",
                     default="trio")
    parser.addoption("--tpt-proto", action="store", dest="tpt_proto",
                     default="tcp")

def pytest_configure(config):
    seen = {
        "flags": [config.getoption("spawn_backend"), config.getoption("tpt_proto")],
        "envelope": os.environ.get("_TRACTOR_RT_VARS"),
    }
    with open(os.path.join(str(config.rootpath), "seen.json"), "w") as f:
        json.dump(seen, f)
"""

TARGET_TEST = """\
def test_selected(spawn_backend, tpt_proto, session_id):
    assert session_id.startswith("tests-" + spawn_backend + "-" + tpt_proto)

def test_not_selected():
    raise AssertionError("posargs -k must deselect this")
"""


def test_target_with_its_own_flags_runs_under_the_nox_sessions(tmp_path: Path) -> None:
    project = make_project(tmp_path, 'backends = ["mp_forkserver"]\n')
    (project / "conftest.py").write_text(TARGET_CONFTEST)
    (project / "test_target.py").write_text(TARGET_TEST)

    done = nox(
        project,
        "--no-venv",
        "-s",
        "tests-mp_forkserver-uds",
        "--",
        "-k",
        "selected and not not_selected",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    seen = json.loads((project / "seen.json").read_text())
    assert seen["flags"] == ["mp_forkserver", "uds"]
    assert "'spawn_backend': 'mp_forkserver'" in seen["envelope"]
    assert "'tpt_proto': 'uds'" in seen["envelope"]
    assert "1 passed, 1 deselected" in done.stdout + done.stderr

    run_dirs = list((project / "reports" / "tests-mp_forkserver-uds").iterdir())
    assert len(run_dirs) == 1
    assert (run_dirs[0] / "junit.xml").is_file()


CHECK_VENV = """\
import os, sys, time
from pathlib import Path

venv = Path(os.environ["VIRTUAL_ENV"])
assert Path(sys.prefix).resolve() == venv.resolve(), (sys.prefix, venv)
assert os.environ["_TRACTOR_RT_VARS"]
# Stay a while, checking that nobody rebuilds the virtualenv under us.
for _ in range(30):
    assert (venv / "bin" / "python").exists(), "the virtualenv vanished"
    assert (venv / ".harness-venv.json").exists(), "the virtualenv was rebuilt"
    time.sleep(0.1)
print("venv ok", venv)
"""


def test_two_identical_nox_runs_at_once_both_pass(tmp_path: Path) -> None:
    project = make_project(
        tmp_path,
        'backends = ["trio"]\ntransports = ["tcp"]\ninstall = []\n'
        'command = "python check_venv.py {posargs}"\nflags = []\njunit-xml = false\n',
    )
    (project / "check_venv.py").write_text(CHECK_VENV)
    procs = [
        subprocess.Popen(
            [NOX, "--no-color", "-s", "tests-trio-tcp"],
            cwd=project,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output
        assert "venv ok" in output
    # One run built the virtualenv; the other used it instead of rebuilding.
    assert any("Sharing the virtualenv" in o or "Reusing" in o for o in outputs), (
        outputs
    )
    runs = list((project / "reports" / "tests-trio-tcp").iterdir())
    assert len(runs) == 2


def test_sequential_runs_rebuild_unless_reuse_is_asked(tmp_path: Path) -> None:
    project = make_project(
        tmp_path,
        'backends = ["trio"]\ntransports = ["tcp"]\ninstall = []\n'
        'command = "python check_venv.py"\nflags = []\njunit-xml = false\n',
    )
    (project / "check_venv.py").write_text(CHECK_VENV.replace("range(30)", "range(1)"))
    marker = project / ".nox" / "tests-trio-tcp" / MARKER

    assert nox(project, "-s", "tests-trio-tcp").returncode == 0
    first = json.loads(marker.read_text())["created_at"]
    assert nox(project, "-s", "tests-trio-tcp").returncode == 0
    second = json.loads(marker.read_text())["created_at"]
    assert second > first  # nox's default: a fresh virtualenv per run
    done = nox(project, "-R", "-s", "tests-trio-tcp")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(marker.read_text())["created_at"] == second


def test_bad_config_fails_nox_loading_with_the_key(tmp_path: Path) -> None:
    project = make_project(tmp_path, 'transport = ["tcp"]\n')
    done = nox(project, "-l")
    assert done.returncode != 0
    assert "'transports'" in done.stdout + done.stderr


@pytest.mark.slow
def test_this_repos_matrix_runs_all_at_once() -> None:
    # The README's main command, on this repository: every session at once.
    repo = Path(__file__).resolve().parents[1]
    done = nox(repo, "-j", "auto", "-t", "tests", timeout=1800)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    names = Matrix.load(repo).names()
    for name in names:
        assert f"* {name}: success" in done.stdout + done.stderr
