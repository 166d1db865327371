"""Tests of harness.pytest_plugin, each through a real pytest subprocess.

Every run happens in a project made in a temp dir, with the plugin loaded
through its ``pytest11`` entry point as a user gets it, and the per-test
runtime dir of tests/conftest.py, so sessions opened here are private.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from harness.records import SessionStore
from harness.rtvars import RT_VARS_ENV
from harness.session import Session

#: A test file that writes what it sees (fixtures, own env, a child's env).
PROBE = """
import json, os, subprocess, sys

def test_probe(rtvars, session_id, reg_addr, bindspace, spawn_backend, tpt_proto):
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ['_TRACTOR_RT_VARS'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    seen = {
        "session_id": session_id,
        "reg_addr": list(reg_addr),
        "bindspace": str(bindspace),
        "bindspace_exists": bindspace.is_dir(),
        "spawn_backend": spawn_backend,
        "tpt_proto": tpt_proto,
        "rtvars_backend": rtvars.spawn_backend,
        "rtvars_proto": rtvars.tpt_proto,
        "own_envelope": os.environ["_TRACTOR_RT_VARS"],
        "child_envelope": child,
    }
    with open(os.environ["PROBE_OUT"], "w") as f:
        json.dump(seen, f)
"""

#: tractor's way: the two flags defined by the project, with defaults.
FLAGS_CONFTEST = """
def pytest_addoption(parser):
    parser.addoption("--spawn-backend", action="store", dest="spawn_backend",
                     default="trio")
    parser.addoption("--tpt-proto", action="store", dest="tpt_proto",
                     default="tcp")

def pytest_configure(config):
    config.seen_flags = (config.getoption("spawn_backend"),
                         config.getoption("tpt_proto"))
"""


def run_pytest(
    project: Path,
    *args: str,
    env: dict[str, str] | None = None,
    autoload: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run pytest in *project*; return the finished process.

    Without *autoload*, only this plugin is loaded (by its entry point name),
    which spares each run the second it takes to import hypothesis.
    """
    base = dict(os.environ if env is None else env)
    base["PROBE_OUT"] = str(project / "probe.json")
    base.pop("PYTEST_ADDOPTS", None)
    load: list[str] = []
    if not autoload:
        base["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
        load = ["-p", "harness"]
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", *load, *args],
        cwd=project,
        env=base,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def probe(project: Path) -> dict:
    import json

    return json.loads((project / "probe.json").read_text())


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "test_probe.py").write_text(PROBE)
    return tmp_path


def test_bare_run_opens_a_private_session_and_checks_leaks(
    project: Path, runtime_dir: Path
) -> None:
    # As a user gets it: the plugin autoloaded with every other one.
    done = run_pytest(project, autoload=True)
    assert done.returncode == 0, done.stdout + done.stderr
    seen = probe(project)
    assert seen["session_id"].startswith("pytest-")
    assert seen["reg_addr"][0] == "127.0.0.1"
    assert isinstance(seen["reg_addr"][1], int)
    assert seen["bindspace_exists"]
    assert Path(seen["bindspace"]).parent == runtime_dir / "tractor"
    assert (seen["spawn_backend"], seen["tpt_proto"]) == ("trio", "tcp")
    assert seen["child_envelope"] == seen["own_envelope"]
    assert f"harness: session {seen['session_id']} (opened by this pytest)" in (
        done.stdout
    )
    assert "harness leak check" in done.stdout
    assert "clean, nothing left behind" in done.stdout
    # Closed clean: nothing of the session is left.
    assert not Path(seen["bindspace"]).exists()
    assert SessionStore(runtime_dir).list() == []


def test_harness_session_no_opens_nothing(project: Path) -> None:
    (project / "test_flags.py").write_text(
        "def test_defaults(spawn_backend, tpt_proto):\n"
        "    assert (spawn_backend, tpt_proto) == ('trio', 'tcp')\n"
        "def test_no_envelope():\n"
        "    import os; assert '_TRACTOR_RT_VARS' not in os.environ\n"
    )
    done = run_pytest(project, "--harness-session=no", "test_flags.py")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "harness leak check" not in done.stdout
    done = run_pytest(project, "--harness-session=no", "test_probe.py")
    assert done.returncode == 1
    assert "no harness session: the envelope is missing" in done.stdout


def test_ini_option_turns_the_session_off(project: Path) -> None:
    (project / "pytest.ini").write_text("[pytest]\nharness_session = no\n")
    (project / "test_env.py").write_text(
        "def test_no_envelope():\n"
        "    import os; assert '_TRACTOR_RT_VARS' not in os.environ\n"
    )
    done = run_pytest(project, "test_env.py")
    assert done.returncode == 0, done.stdout + done.stderr


def test_p_no_harness_disables_the_plugin(project: Path) -> None:
    done = run_pytest(project, "-p", "no:harness", autoload=True)
    assert done.returncode == 1
    assert "fixture 'rtvars' not found" in done.stdout
    assert "harness leak check" not in done.stdout


def test_flags_defined_by_the_project_conftest_coexist(project: Path) -> None:
    (project / "conftest.py").write_text(FLAGS_CONFTEST)
    done = run_pytest(project, "--spawn-backend=mp_spawn", "--tpt-proto", "uds")
    assert done.returncode == 0, done.stdout + done.stderr
    seen = probe(project)
    assert (seen["spawn_backend"], seen["tpt_proto"]) == ("mp_spawn", "uds")
    # The standalone session was opened for the flags' values, so the
    # envelope, and every child's, says the same.
    assert (seen["rtvars_backend"], seen["rtvars_proto"]) == ("mp_spawn", "uds")
    assert seen["child_envelope"] == seen["own_envelope"]
    assert "'registry@" in seen["own_envelope"]  # a uds registry address


def test_flags_defined_by_a_p_plugin_coexist(project: Path) -> None:
    (project / "tractorish_plugin.py").write_text(FLAGS_CONFTEST)
    (project / "pytest.ini").write_text(
        "[pytest]\naddopts = -p tractorish_plugin --spawn-backend=mp_forkserver\n"
    )
    env = {**os.environ, "PYTHONPATH": str(project)}
    done = run_pytest(project, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    seen = probe(project)
    # Given in addopts counts as given.
    assert seen["spawn_backend"] == "mp_forkserver"
    assert seen["rtvars_backend"] == "mp_forkserver"
    # Not given: the plugin's own default (tcp) applies.
    assert seen["tpt_proto"] == "tcp"


def test_flags_update_an_inherited_envelope(project: Path, runtime_dir: Path) -> None:
    (project / "conftest.py").write_text(FLAGS_CONFTEST)
    with Session("outer", backend="trio", transport="tcp") as outer:
        done = run_pytest(project, "--spawn-backend=mp_spawn", env=outer.env())
        assert done.returncode == 0, done.stdout + done.stderr
        seen = probe(project)
        # No new session: the run joins the outer one...
        assert seen["session_id"] == outer.id
        assert "(inherited)" in done.stdout
        assert "harness leak check" not in done.stdout
        # ...and the flag given on the command line reached the envelope.
        assert seen["rtvars_backend"] == "mp_spawn"
        assert "'spawn_backend': 'mp_spawn'" in seen["child_envelope"]
        assert seen["tpt_proto"] == "tcp"
        # A flag left at its default does not overwrite the envelope.
        done = run_pytest(project, env=outer.env())
        assert probe(project)["spawn_backend"] == "trio"


def test_envelope_without_flags_is_used_as_is(project: Path) -> None:
    (project / "conftest.py").write_text(FLAGS_CONFTEST)
    with Session("outer", backend="mp_forkserver", transport="uds") as outer:
        done = run_pytest(project, env=outer.env())
        assert done.returncode == 0, done.stdout + done.stderr
        seen = probe(project)
    assert (seen["rtvars_backend"], seen["rtvars_proto"]) == ("mp_forkserver", "uds")
    # The fixture follows the envelope when the flag is not given.
    assert (seen["spawn_backend"], seen["tpt_proto"]) == ("mp_forkserver", "uds")


def test_leaked_process_is_reported_not_killed(project: Path) -> None:
    pid_file = project / "leaked.pid"
    (project / "test_leak.py").write_text(
        textwrap.dedent(
            f"""
            import subprocess, sys

            def test_leaves_a_child_behind():
                proc = subprocess.Popen(
                    [sys.executable, "-c", "import time; time.sleep(60)"],
                    start_new_session=True,
                )
                open({str(pid_file)!r}, "w").write(str(proc.pid))
            """
        )
    )
    done = run_pytest(project, "test_leak.py")
    pid = int(pid_file.read_text())
    try:
        # warn mode: the run's status stands, the process lives on.
        assert done.returncode == 0, done.stdout + done.stderr
        assert "left 1 process" in done.stdout
        assert str(pid) in done.stdout
        assert psutil.pid_exists(pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).wait(10)


def test_stack_dumps_on_the_diag_signal(project: Path) -> None:
    (project / "test_dump.py").write_text(
        textwrap.dedent(
            """
            import os, signal, time
            from pathlib import Path

            def test_dump_here_xyz(bindspace):
                os.kill(os.getpid(), signal.SIGUSR2)
                stacks = bindspace / "stacks" / f"{os.getpid()}.txt"
                for _ in range(100):
                    if "test_dump_here_xyz" in stacks.read_text():
                        break
                    time.sleep(0.05)
                assert "test_dump_here_xyz" in stacks.read_text()
            """
        )
    )
    done = run_pytest(project, "test_dump.py")
    assert done.returncode == 0, done.stdout + done.stderr


def test_bad_diag_signal_is_a_usage_error(project: Path) -> None:
    done = run_pytest(project, "--harness-diag-signal=SIGNOPE")
    assert done.returncode == 4
    assert "SIGNOPE" in done.stderr


def test_bad_tool_harness_is_a_usage_error(project: Path) -> None:
    (project / "pyproject.toml").write_text("[tool.harness]\nbackend = ['trio']\n")
    done = run_pytest(project)
    assert done.returncode == 4
    assert "'backend'" in done.stderr
    assert "'backends'" in done.stderr


def test_envelope_name_from_tool_harness(project: Path) -> None:
    (project / "pyproject.toml").write_text(
        '[tool.harness]\nenvelope-name = "_MY_RT_VARS"\n'
    )
    (project / "test_name.py").write_text(
        "import os\n"
        "def test_name(session_id):\n"
        "    assert session_id in os.environ['_MY_RT_VARS']\n"
        f"    assert {RT_VARS_ENV!r} not in os.environ\n"
    )
    done = run_pytest(project, "test_name.py")
    assert done.returncode == 0, done.stdout + done.stderr
