"""The scripts under ci/: real nox, real pytest runs, real leak reports.

The end-to-end tests build a small project in a temporary folder whose
noxfile registers the harness's own sessions (`harness.nox_sessions`), run
it with ``--no-venv`` (no virtualenvs, no network), and read back what the
workflow would show.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

CI_DIR = Path(__file__).resolve().parent.parent / "ci"
sys.path.insert(0, str(CI_DIR))

import cli_support  # noqa: E402
import collect_reports  # noqa: E402
import dry_run  # noqa: E402
import gate  # noqa: E402
import matrix_output  # noqa: E402
import run_leg  # noqa: E402
import step_summary  # noqa: E402
from junit_counts import read_junit  # noqa: E402
from leak_summary import read_leak_file  # noqa: E402
from leg_reports import LEG_FILE, LegRecord, find_legs, read_leg  # noqa: E402
from nox_listing import (  # noqa: E402
    NoxSession,
    build_legs,
    check_drift,
    github_matrix,
    parse_nox_list,
)
from summary_markdown import ROW_LIMIT, cell, code, render_leg  # noqa: E402

from harness.errors import HarnessError  # noqa: E402

# ------------------------------------------------------------------ helpers

SAMPLE_PYPROJECT = """\
[project]
name = "sample"
version = "0"

[tool.harness]
backends = ["trio", "mp_spawn"]
transports = ["tcp"]
command = "python -m pytest tests -p no:cacheprovider -q {posargs}"
flags = []
"""

SAMPLE_NOXFILE = """\
import harness.nox_sessions

harness.nox_sessions.register()
"""

SAMPLE_TESTS = """\
import ast
import os
import shutil

BACKEND = ast.literal_eval(os.environ["_TRACTOR_RT_VARS"])["spawn_backend"]


def test_passes():
    assert True


def test_only_trio_passes():
    assert BACKEND == "trio", f"backend | is {BACKEND}"
"""


def make_project(root: Path, *, extra_nox: str = "") -> Path:
    """A project with two harness sessions; tests-mp_spawn-tcp fails one test."""
    (root / "tests").mkdir(parents=True)
    (root / "pyproject.toml").write_text(SAMPLE_PYPROJECT)
    (root / "noxfile.py").write_text(SAMPLE_NOXFILE + extra_nox)
    (root / "tests" / "test_sample.py").write_text(SAMPLE_TESTS)
    return root


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("GITHUB_ACTIONS", "GITHUB_OUTPUT", "GITHUB_STEP_SUMMARY", "CI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("_TRACTOR_RT_VARS", raising=False)
    # The sample's pytest needs none of the plugins installed here.
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    return make_project(tmp_path / "proj")


def run_pytest_junit(folder: Path, source: str) -> Path:
    """Run real pytest on *source*; return the JUnit XML it wrote."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test_it.py").write_text(textwrap.dedent(source))
    xml = folder / "junit.xml"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(folder / "test_it.py"),
            f"--junitxml={xml}",
            "--rootdir",
            str(folder),
        ],
        cwd=folder,
        env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
        capture_output=True,
        check=False,
    )
    assert xml.is_file()
    return xml


def write_leg(folder: Path, **fields: object) -> None:
    record = {"session": folder.name, "started_at": time.time() - 5, **fields}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LEG_FILE).write_text(json.dumps(record))


# --------------------------------------------------------------- JUnit XML


def test_junit_counts_a_real_pytest_run(tmp_path: Path) -> None:
    xml = run_pytest_junit(
        tmp_path / "run",
        """
        import pytest

        @pytest.fixture
        def broken():
            raise RuntimeError("fixture | broke")

        def test_ok():
            pass

        def test_bad():
            assert 1 == 2, "one is not two"

        def test_skip():
            pytest.skip("not here")

        def test_error(broken):
            pass
        """,
    )
    counts = read_junit(xml)
    assert (counts.passed, counts.failed, counts.errors, counts.skipped) == (1, 1, 1, 1)
    assert counts.problem is None
    assert not counts.ok
    by_kind = {f.kind: f for f in counts.failures}
    assert by_kind["failure"].test_id.endswith("::test_bad")
    assert "one is not two" in by_kind["failure"].message
    assert by_kind["error"].test_id.endswith("::test_error")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('<testsuites><testsuite name="x"><testcase name="a">', "not well-formed"),
        ("<coverage/>", "not JUnit XML"),
        ("", "not well-formed"),
    ],
)
def test_junit_bad_files_are_reported_not_raised(
    tmp_path: Path, content: str, problem: str
) -> None:
    path = tmp_path / "junit.xml"
    path.write_text(content)
    counts = read_junit(path)
    assert counts.problem is not None
    assert problem in counts.problem
    assert not counts.ok


def test_junit_missing_file(tmp_path: Path) -> None:
    counts = read_junit(tmp_path / "nope.xml")
    assert counts.problem is not None
    assert "cannot be read" in counts.problem


# ------------------------------------------------------------- leak reports


def test_leak_rows_from_a_real_harness_check(tmp_path: Path, clean_env: None) -> None:
    """A session with a live child and a stale socket, checked by the CLI."""
    from harness.session import Session

    report = tmp_path / "leaks.json"
    session = Session("leaky", backend="trio", transport="tcp").open()
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], env=session.env()
    )
    try:
        sock_path = session.bindspace / "registry@1616.sock"
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(sock_path))
        sock.close()  # the file stays: a stale socket, as after a SIGKILL
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "harness",
                "check",
                session.id,
                "--report",
                str(report),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 86, result.stderr
    finally:
        child.kill()
        child.wait()
        session.close()

    leak_file = read_leak_file(report)
    assert leak_file is not None
    assert leak_file.problem is None
    assert [s.session for s in leak_file.sessions] == [session.id]
    kinds = {row.kind: row for row in leak_file.rows}
    assert kinds["socket"].where == str(sock_path)
    assert "stale" in kinds["socket"].what
    assert kinds["process"].what.startswith(f"pid {child.pid} ")
    assert "envelope" in kinds["process"].found_by

    folder = tmp_path / "reports" / "tests-trio-tcp"
    write_leg(folder, exit_status=0, duration=3.0)
    (folder / "leaks.json").write_bytes(report.read_bytes())
    leg = read_leg("tests-trio-tcp", [folder])
    assert leg.verdict == "leaked"
    assert leg.leak_count == 2
    markdown = render_leg(leg)
    assert str(sock_path) in markdown
    assert f"pid {child.pid}" in markdown
    assert f"session `{session.id}`" in markdown


def test_json_that_is_not_a_leak_report_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"coverage": 93}))
    assert read_leak_file(path) is None
    broken = tmp_path / "leaks.json"
    broken.write_text('{"sockets": [')
    leak_file = read_leak_file(broken)
    assert leak_file is not None
    assert leak_file.problem is not None


# ------------------------------------------------------------ leg verdicts


def test_leg_verdicts(tmp_path: Path) -> None:
    passing = tmp_path / "pass"
    xml = run_pytest_junit(passing, "def test_ok():\n    pass\n")
    write_leg(passing, exit_status=0, duration=1.5)
    assert read_leg("pass", [passing]).verdict == "passed"

    failing = tmp_path / "fail"
    write_leg(failing, exit_status=1, duration=1.5)
    (failing / "junit.xml").write_bytes(xml.read_bytes())
    assert read_leg("fail", [failing]).verdict == "failed"

    unfinished = tmp_path / "unfinished"
    write_leg(unfinished, exit_status=None)
    assert read_leg("unfinished", [unfinished]).verdict == "failed"

    hung = tmp_path / "hung"
    write_leg(hung, exit_status=87)
    (hung / "run1").mkdir()
    (hung / "run1" / "hang.txt").write_text("pid 1 stuck in select()\n")
    leg = read_leg("hung", [hung])
    assert leg.verdict == "hung"
    assert "stuck in select()" in render_leg(leg)

    skipped = tmp_path / "skipped"
    write_leg(skipped, exit_status=0, nox_result="skipped", nox_reason="no python")
    assert read_leg("skipped", [skipped]).verdict == "skipped"

    assert read_leg("none", [tmp_path / "none"]).verdict == "not run"


def test_reports_older_than_the_leg_are_not_counted(tmp_path: Path) -> None:
    folder = tmp_path / "tests-trio-tcp"
    old = run_pytest_junit(folder / "old-run", "def test_bad():\n    assert 0\n")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    write_leg(folder, exit_status=0, duration=2.0)
    leg = read_leg("tests-trio-tcp", [folder])
    assert leg.stale == (old,)
    assert leg.failed == 0
    assert "earlier run" in render_leg(leg)


def test_render_escapes_and_truncates(tmp_path: Path) -> None:
    cases = "\n".join(
        f'<testcase classname="t" name="test_{i}[a|b]">'
        f'<failure message="bad &lt;{i}&gt; | x"/></testcase>'
        for i in range(ROW_LIMIT + 5)
    )
    folder = tmp_path / "tests-trio-tcp"
    write_leg(folder, exit_status=1, duration=75.0)
    (folder / "junit.xml").write_text(f"<testsuite>{cases}</testsuite>")
    markdown = render_leg(read_leg("tests-trio-tcp", [folder]), artifact="reports-x")
    assert f"Failed tests ({ROW_LIMIT + 5})" in markdown
    assert "... and 5 more" in markdown
    assert "bad &lt;0&gt; \\| x" in markdown
    assert "1 min 15 s" in markdown
    assert "`reports-x`" in markdown
    assert "python ci/dry_run.py --session tests-trio-tcp" in markdown
    assert cell("a|b\nc") == "a\\|b c"
    assert code("x`y") == "``x`y``"


# ---------------------------------------------------------------- the gate


@pytest.mark.parametrize(
    ("results", "status"),
    [
        ({"matrix": "success", "tests": "success"}, 0),
        ({"matrix": "success", "tests": "failure"}, 1),
        ({"matrix": "failure", "tests": "skipped"}, 1),
        ({"matrix": "success", "tests": "cancelled"}, 1),
    ],
)
def test_gate(results: dict[str, str], status: int) -> None:
    needs = {job: {"result": r, "outputs": {}} for job, r in results.items()}
    assert gate.main(["--needs", json.dumps(needs)]) == status


def test_gate_runs_as_the_workflow_calls_it() -> None:
    needs = {"tests": {"result": "failure", "outputs": {}}}
    result = subprocess.run(
        [sys.executable, str(CI_DIR / "gate.py")],
        env={**os.environ, "NEEDS": json.dumps(needs)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "tests  failure" in result.stdout
    assert gate.main(["--needs", "{}"]) == 2
    assert gate.main(["--needs", "not json"]) == 2


# ----------------------------------------------------- GitHub's step files


def test_set_output_single_and_multi_line(tmp_path: Path) -> None:
    out = tmp_path / "output"
    assert cli_support.set_output("matrix", '{"include":[]}', path=str(out))
    assert cli_support.set_output("notes", "a\nb", path=str(out))
    lines = out.read_text().splitlines()
    assert lines[0] == 'matrix={"include":[]}'
    assert lines[1].startswith("notes<<ghadelimiter_")
    assert lines[2:4] == ["a", "b"]
    assert lines[4] == lines[1].split("<<", 1)[1]


# ---------------------------------------------------------- session listing


def test_parse_nox_list_rejects_what_is_not_its_json() -> None:
    with pytest.raises(HarnessError, match="not JSON"):
        parse_nox_list("nox > Sessions defined in noxfile.py:")
    with pytest.raises(HarnessError, match="without a session id"):
        parse_nox_list('[{"name": "x"}]')
    sessions = parse_nox_list(
        '[{"session": "tests-trio-tcp-3.13", "name": "tests-trio-tcp",'
        ' "python": "3.13", "tags": ["tests"]},'
        ' {"session": "tests-trio-uds", "name": "tests-trio-uds", "python": false}]'
    )
    assert [s.python for s in sessions] == ["3.13", None]


def test_check_drift_names_both_sides() -> None:
    check_drift(["b", "a"], ["a", "b"])
    with pytest.raises(HarnessError) as info:
        check_drift(["tests-trio-tcp", "extra"], ["tests-trio-tcp", "tests-trio-uds"])
    assert "only in `nox -l`:         extra" in str(info.value)
    assert "only in `harness matrix`: tests-trio-uds" in str(info.value)


def test_build_legs_crosses_sessions_with_oses() -> None:
    sessions = [
        NoxSession("tests-trio-tcp", "tests-trio-tcp", None),
        NoxSession("tests-mp_spawn-uds-3.12", "tests-mp_spawn-uds", "3.12"),
    ]
    legs = build_legs(
        sessions, None, oses=["ubuntu-latest", "macos-14"], default_python="3.13"
    )
    include = github_matrix(legs)["include"]
    assert len(include) == 4
    assert len({entry["artifact"] for entry in include}) == 4
    first = include[0]
    assert first["title"] == "tests-trio-tcp (ubuntu-latest)"
    assert (first["backend"], first["transport"], first["python"]) == (
        "trio",
        "tcp",
        "3.13",
    )
    assert include[1]["python"] == "3.12"
    assert include[1]["backend"] == "mp_spawn"
    with pytest.raises(HarnessError, match="nothing to run"):
        build_legs([], None, oses=["ubuntu-latest"], default_python="3.13")
    with pytest.raises(HarnessError, match="--os"):
        build_legs(sessions, None, oses=[], default_python="3.13")


# ------------------------------------------------------------- end to end


def test_matrix_output_writes_the_step_outputs(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output, summary = tmp_path / "output", tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_OUTPUT", str(output))
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    status = matrix_output.main(
        ["--project", str(project), "--os", "ubuntu-latest", "--os", "macos-latest"]
    )
    assert status == 0
    values = dict(line.split("=", 1) for line in output.read_text().splitlines())
    include = json.loads(values["matrix"])["include"]
    assert values["count"] == "4"
    assert {(e["session"], e["os"]) for e in include} == {
        (s, o)
        for s in ("tests-trio-tcp", "tests-mp_spawn-tcp")
        for o in ("ubuntu-latest", "macos-latest")
    }
    assert "2 sessions x 2 operating systems = 4 legs" in summary.read_text()


def test_matrix_output_refuses_a_drifted_noxfile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = (
        "\nimport nox\n\n"
        "@nox.session(name='tests-extra-tcp', tags=['tests'], python=False)\n"
        "def extra(session):\n    pass\n"
    )
    proj = make_project(tmp_path / "drift", extra_nox=extra)
    status = matrix_output.main(["--project", str(proj), "--os", "ubuntu-latest"])
    assert status == 85
    assert "only in `nox -l`:         tests-extra-tcp" in capsys.readouterr().err


def test_dry_run_runs_every_leg_and_writes_the_summary(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = dry_run.main(["--project", str(project), "--no-venv"])
    assert status == 1  # tests-mp_spawn-tcp fails one test

    summary = (project / "reports" / "ci-summary.md").read_text()
    assert "Dry run: 2 legs: 1 failed, 1 passed" in summary
    assert "test_only_trio_passes" in summary
    assert "backend \\| is mp_spawn" in summary
    assert "`nox -s tests-mp_spawn-tcp --no-venv` exited with status 1" in summary

    legs = {leg.session: leg for leg in find_legs(project / "reports")}
    assert legs["tests-trio-tcp"].verdict == "passed"
    assert legs["tests-trio-tcp"].passed == 2
    assert legs["tests-mp_spawn-tcp"].failed == 1
    out = capsys.readouterr().out
    assert "python ci/dry_run.py --session tests-mp_spawn-tcp" in out

    # A second run of one leg: the first run's reports are not counted again.
    assert dry_run.main(["--project", str(project), "--no-venv", "-s", "*trio*"]) == 0
    leg = read_leg("tests-trio-tcp", [project / "reports" / "tests-trio-tcp"])
    assert leg.passed == 2
    # Every report of the first run (JUnit XML and leak report) is stale,
    # and they all sit in one run folder, the older one.
    assert {p.suffix for p in leg.stale} == {".xml", ".json"}
    folder = project / "reports" / "tests-trio-tcp"
    runs = sorted(p.name for p in folder.iterdir() if p.is_dir())
    assert len(runs) == 2
    assert {p.parent.name for p in leg.stale} == {runs[0]}


def test_dry_run_list_and_bad_pattern(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert dry_run.main(["--project", str(project), "--list"]) == 0
    assert capsys.readouterr().out.split() == ["tests-trio-tcp", "tests-mp_spawn-tcp"]
    assert dry_run.main(["--project", str(project), "--list", "-s", "nope"]) == 85
    assert "matches no test session" in capsys.readouterr().err


def test_run_leg_step_summary_and_collect_as_in_the_workflow(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The three steps of a leg, then the gate job's overview of artifacts."""
    monkeypatch.chdir(project)
    script = [sys.executable, str(CI_DIR / "run_leg.py")]
    result = subprocess.run(
        [
            *script,
            "--session",
            "tests-mp_spawn-tcp",
            "--os",
            "ubuntu-latest",
            "--python",
            "3.13",
            "--",
            "--no-venv",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    folder = project / "reports" / "tests-mp_spawn-tcp"
    record = LegRecord.from_json(json.loads((folder / LEG_FILE).read_text()))
    assert record.exit_status == 1
    assert record.nox_result == "failed"
    assert record.os == "ubuntu-latest"
    assert record.duration is not None
    assert record.duration > 0

    summary = tmp_path / "step-summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    assert step_summary.main(["--session", "tests-mp_spawn-tcp"]) == 0
    text = summary.read_text()
    assert text.startswith("### ❌ tests-mp_spawn-tcp (ubuntu-latest): failed")
    assert "| 2 | 1 | 1 | 0 | 0 | 0 |" in text

    # The gate job downloads every artifact into its own folder.
    artifacts = tmp_path / "artifacts" / "reports-tests-mp_spawn-tcp-ubuntu-latest"
    artifacts.mkdir(parents=True)
    shutil.copytree(project / "reports", artifacts, symlinks=True, dirs_exist_ok=True)
    overview = tmp_path / "overview.md"
    status = collect_reports.main(
        [str(tmp_path / "artifacts"), "--output", str(overview), "--strict"]
    )
    assert status == 1
    assert "1 leg: 1 failed" in overview.read_text()
    assert collect_reports.main([str(tmp_path / "empty"), "--strict"]) == 2


def test_run_leg_passes_a_signal_on_to_nox(project: Path) -> None:
    """SIGTERM to run_leg (a cancelled job) ends nox, and leg.json says so."""
    (project / "tests" / "test_slow.py").write_text(
        "import time\n\ndef test_slow():\n    time.sleep(30)\n"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            str(CI_DIR / "run_leg.py"),
            "--session",
            "tests-trio-tcp",
            "--project",
            str(project),
            "--",
            "--no-venv",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    folder = project / "reports" / "tests-trio-tcp"
    deadline = time.monotonic() + 30
    # The session makes its run folder just before it starts pytest.
    while time.monotonic() < deadline and not (
        folder.is_dir() and any(p.is_dir() for p in folder.iterdir())
    ):
        time.sleep(0.1)
    time.sleep(1.0)  # let pytest reach the slow test
    proc.terminate()
    status = proc.wait(timeout=30)
    record = json.loads((folder / LEG_FILE).read_text())
    assert status != 0
    assert record["exit_status"] not in (0, None)
    assert run_leg.exit_status(LegRecord.from_json(record)) != 0
    # nox got SIGINT, so it stopped pytest too: nothing runs in the project.
    deadline = time.monotonic() + 10
    while (left := _processes_in(project)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == []


def _processes_in(folder: Path) -> list[int]:
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if Path(proc.cwd()).is_relative_to(folder) and proc.status() != "zombie":
                found.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    return found


def test_a_leg_without_test_reports_quotes_nox(project: Path) -> None:
    """A leg that fails before pytest starts still says why, in its summary."""
    pyproject = project / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text().replace(
            'command = "python -m pytest', 'command = "no-such-command-3f9a pytest'
        )
    )
    assert dry_run.main(["--project", str(project), "--no-venv", "-s", "*trio*"]) == 1
    summary = (project / "reports" / "ci-summary.md").read_text()
    assert "No JUnit XML was written" in summary
    assert "lines of nox's output" in summary
    assert "no-such-command-3f9a" in summary
