"""``harness env``, run as the real command in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest

from harness import exit_codes
from harness.rtvars import RT_VARS_ENV, RuntimeVars, encode_rtvars, read_raw_rtvars

pytestmark = pytest.mark.usefixtures("clean_env")

ENVELOPE = {
    "session": "tests-trio-tcp-3f9a2c1b",
    "tpt_proto": "tcp",
    "_registry_addrs": [("127.0.0.1", 24117)],
    "_enable_tpts": ["tcp"],
    # Unknown to this version, and rich markup if it were printed as markup.
    "future_knob": ("[bold]x[/bold]", 1),
}


def harness_env(
    python: str, *args: str, envelope: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != RT_VARS_ENV}
    if envelope is not None:
        env[RT_VARS_ENV] = envelope
    # A wide terminal, so that no value is folded across lines.
    env["COLUMNS"] = "200"
    return subprocess.run(
        [python, "-m", "harness", "env", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def sleeper(python: str) -> Iterator[subprocess.Popen[str]]:
    """A live process started with ENVELOPE, waiting on its stdin."""
    env = {**os.environ, RT_VARS_ENV: encode_rtvars(ENVELOPE)}
    child = subprocess.Popen(
        [python, "-c", "import sys; print('ready', flush=True); sys.stdin.read()"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    yield child
    child.communicate("", timeout=60)


def test_prints_this_processes_envelope_as_a_table(python: str) -> None:
    done = harness_env(python, envelope=encode_rtvars(ENVELOPE))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"{RT_VARS_ENV} of this process (pid ")
    rows = {line.split()[0]: line.split(None, 1)[1].strip() for line in lines[2:20]}
    assert rows["session"] == "'tests-trio-tcp-3f9a2c1b'"
    assert rows["_registry_addrs"] == "[('127.0.0.1', 24117)]"
    assert rows["_debug_mode"] == "False"
    # The unknown key is listed, with its brackets shown, not eaten as markup.
    assert "future_knob         ('[bold]x[/bold]', 1)" in done.stdout
    assert "1 unknown key(s)" in done.stdout
    assert f"raw: {RT_VARS_ENV}=" + encode_rtvars(ENVELOPE)[:40] in done.stdout


def test_pid_prints_another_processes_envelope(
    python: str, sleeper: subprocess.Popen[str]
) -> None:
    done = harness_env(python, "--pid", str(sleeper.pid))
    assert done.returncode == 0, done.stderr
    assert f"{RT_VARS_ENV} of process {sleeper.pid} (" in done.stdout
    assert "'tests-trio-tcp-3f9a2c1b'" in done.stdout


def test_json_has_every_field_and_the_unknown_keys(
    python: str, sleeper: subprocess.Popen[str]
) -> None:
    done = harness_env(python, "--pid", str(sleeper.pid), "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert set(RuntimeVars.__struct_fields__) <= set(data)
    assert data["session"] == "tests-trio-tcp-3f9a2c1b"
    assert data["_registry_addrs"] == [["127.0.0.1", 24117]]
    assert data["diag_capture_delay"] == 2.0
    assert data["future_knob"] == ["[bold]x[/bold]", 1]


def test_export_sets_the_same_envelope_in_a_shell(
    python: str, sleeper: subprocess.Popen[str]
) -> None:
    done = harness_env(python, "--pid", str(sleeper.pid), "--export")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"export {RT_VARS_ENV}=")
    shell = subprocess.run(
        ["sh", "-c", done.stdout + f'printf %s "${RT_VARS_ENV}"'],
        capture_output=True,
        text=True,
        check=True,
    )
    # Unchanged, unknown keys and tuples included.
    assert shell.stdout == encode_rtvars(ENVELOPE)
    assert read_raw_rtvars({RT_VARS_ENV: shell.stdout}) == ENVELOPE


def test_a_process_without_an_envelope_exits_1(python: str) -> None:
    done = harness_env(python)
    assert done.returncode == 1
    assert done.stdout == ""
    assert f"has no envelope ({RT_VARS_ENV} is not set)" in done.stderr
    assert "harness exec -- CMD" in done.stderr


def test_another_process_without_an_envelope_exits_1(python: str) -> None:
    env = {key: value for key, value in os.environ.items() if key != RT_VARS_ENV}
    child = subprocess.Popen(
        [python, "-c", "import sys; print('ready', flush=True); sys.stdin.read()"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        child.stdout.readline()
        done = harness_env(python, "--pid", str(child.pid))
    finally:
        child.communicate("", timeout=60)
    assert done.returncode == 1
    assert f"process {child.pid} (" in done.stderr
    assert "has no envelope" in done.stderr


def test_a_pid_that_does_not_exist_exits_1(python: str) -> None:
    # Pids above the kernel's pid_max are never in use (Linux allows at most
    # 2**22; macOS 99,998).
    try:
        with open("/proc/sys/kernel/pid_max") as file:
            pid = int(file.read()) + 1
    except OSError:
        pid = 2**22 + 1
    done = harness_env(python, "--pid", str(pid))
    assert done.returncode == 1
    assert f"no process with pid {pid}" in done.stderr


def test_a_malformed_envelope_is_a_clear_error(python: str) -> None:
    done = harness_env(python, envelope="{'session': __import__('os').getcwd()}")
    assert done.returncode == exit_codes.HARNESS_ERROR
    assert done.stdout == ""
    assert "harness env: error: the envelope of this process" in done.stderr
    assert "is malformed" in done.stderr
    assert "the name '__import__'" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_truncated_envelope_says_where(python: str) -> None:
    done = harness_env(python, envelope="{'session': 'abc', '_enable_tpts': ['tc")
    assert done.returncode == exit_codes.HARNESS_ERROR
    assert "unterminated string literal" in done.stderr
    assert "at character 37" in done.stderr


def test_name_reads_another_variable(python: str) -> None:
    env = {**os.environ, "OTHER_VARS": "{'session': 'other'}"}
    done = subprocess.run(
        [python, "-m", "harness", "env", "--name", "OTHER_VARS", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["session"] == "other"


def test_help_explains_the_exit_statuses(python: str) -> None:
    done = harness_env(python, "--help")
    assert done.returncode == 0
    assert "exit status:" in done.stdout
    assert "/proc/<pid>/environ" in done.stdout
