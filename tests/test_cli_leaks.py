"""``harness check``, ``harness ps`` and ``harness reap`` on hand-built sessions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from leak_sessions import SessionFactory, alive

from harness import exit_codes
from harness.cli import main
from harness.records import SessionStore


def test_check_reports_a_leak_and_exits_86(
    sessions: SessionFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    session = sessions()
    daemon = session.daemon()
    _, path = session.uds_listener("left.sock")
    session.popens[-1].kill()
    session.popens[-1].wait()

    assert main(["check", session.id[:10]]) == exit_codes.LEAKED
    out = capsys.readouterr().out
    assert f"Session {session.id}" in out
    assert "stale" in out
    assert str(daemon) in out
    assert "envelope" in out
    assert str(path) in out  # the path in full
    assert f"harness reap {session.id}" in out


def test_check_json_and_report_file(
    sessions: SessionFactory, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    session = sessions()
    daemon = session.daemon()
    report = tmp_path / "out" / "leaks.json"
    assert main(["check", "--json", "--report", str(report)]) == exit_codes.LEAKED
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(report.read_text())
    assert printed["leaked"] is True
    [entry] = printed["sessions"]
    assert entry["session"] == session.id
    assert [p["pid"] for p in entry["processes"]] == [daemon]


def test_check_of_a_clean_session_exits_0(
    sessions: SessionFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    session = sessions()
    assert main(["check", session.id]) == exit_codes.OK
    assert "clean" in capsys.readouterr().out


def test_check_with_no_sessions(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check"]) == exit_codes.OK
    assert "No sessions in" in capsys.readouterr().out


def test_check_of_an_unknown_session_is_a_harness_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["check", "nope"]) == exit_codes.HARNESS_ERROR
    assert "no session matches 'nope'" in capsys.readouterr().err


def test_ps_shows_the_tree_with_attribution(
    sessions: SessionFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    session = sessions(owner_children=["exec env -i sleep 60"])
    assert session.owner is not None
    [child] = psutil.Process(session.owner.pid).children()
    assert main(["ps", session.id]) == exit_codes.OK
    out = capsys.readouterr().out
    assert f"{session.owner.pid} owner" in out
    assert f"{child.pid} sleep 60" in out
    assert "descendant" in out


def test_reap_dry_run_then_reap(
    sessions: SessionFactory, capsys: pytest.CaptureFixture[str], runtime_dir: Path
) -> None:
    session = sessions()
    daemon = session.daemon()
    assert main(["reap", session.id, "--dry-run"]) == exit_codes.OK
    out = capsys.readouterr().out
    assert "dry run" in out
    assert str(daemon) in out
    assert alive(daemon)

    assert main(["reap", session.id, "--grace", "0.3"]) == exit_codes.OK
    out = capsys.readouterr().out
    assert "reaped" in out
    assert "SIGINT" in out
    assert "clean" in out
    assert not alive(daemon)
    assert SessionStore(runtime_dir).list() == []


def test_reap_refuses_a_live_session_without_force(
    sessions: SessionFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    session = sessions(owner_children=["exec sleep 60"])
    assert session.owner is not None
    [child] = psutil.Process(session.owner.pid).children()
    assert main(["reap", session.id]) == exit_codes.HARNESS_ERROR
    assert "is live" in capsys.readouterr().err
    assert alive(child.pid)

    assert main(["reap", session.id, "--force", "--grace", "0.3"]) == exit_codes.OK
    assert not alive(child.pid)
    assert alive(session.owner.pid)  # the owner is never a leak


def test_reap_stale_takes_every_ownerless_session_and_spares_live_ones(
    sessions: SessionFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = sessions("one"), sessions("two")
    live = sessions("live", owner_children=["exec sleep 60"])
    assert live.owner is not None
    [live_child] = psutil.Process(live.owner.pid).children()
    daemons = [first.daemon(), second.daemon()]
    assert main(["reap", "--stale", "--grace", "0.3"]) == exit_codes.OK
    assert not any(alive(pid) for pid in daemons)
    assert alive(live_child.pid)
    assert [r.id for r in SessionStore(first.bindspace.parent.parent).list()] == [
        live.id
    ]


def test_reap_without_a_session_needs_a_single_candidate(
    sessions: SessionFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    sessions("one")
    sessions("two")
    assert main(["reap"]) == exit_codes.HARNESS_ERROR
    assert "--stale" in capsys.readouterr().err


def test_the_installed_command_runs_check(
    sessions: SessionFactory, runtime_dir: Path
) -> None:
    session = sessions()
    session.daemon()
    done = subprocess.run(
        [sys.executable, "-m", "harness", "check", session.id, "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == exit_codes.LEAKED, done.stderr
    assert json.loads(done.stdout)["sessions"][0]["session"] == session.id


def test_help_texts_explain_the_verbs(capsys: pytest.CaptureFixture[str]) -> None:
    for verb, phrase in (
        ("check", "exit status: 0 nothing leaked, 86"),
        ("ps", "how it"),
        ("reap", "SIGINT"),
    ):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        assert phrase in capsys.readouterr().out
