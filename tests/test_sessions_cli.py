"""``harness sessions``: the table, --json and --prune on real sessions."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from harness.cli import main
from harness.records import SessionStore
from harness.session import Session

OWNER = textwrap.dedent(
    """
    import json, socket, sys
    from harness.session import Session
    s = Session(sys.argv[1], command=["pytest", "tests"]).open()
    if sys.argv[2] == "leave-socket":
        socket.socket(socket.AF_UNIX).bind(str(s.socket_dir / "actor@7.sock"))
    print(json.dumps({"id": s.id, "bindspace": str(s.bindspace)}), flush=True)
    sys.stdin.readline()
    """
)


def killed_session(python: str, what: str = "") -> dict[str, str]:
    """Open a session in a child and SIGKILL it: a stale session."""
    owner = subprocess.Popen(
        [python, "-c", OWNER, "killed", what or "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout is not None
    opened: dict[str, str] = json.loads(owner.stdout.readline())
    owner.kill()
    owner.communicate()
    return opened


def sessions(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["sessions", *args]) == 0
    return capsys.readouterr().out


def test_no_sessions(capsys: pytest.CaptureFixture[str], runtime_dir: Path) -> None:
    out = sessions(capsys)
    assert out.startswith(f"No sessions in {runtime_dir}")
    assert "harness exec" in out
    assert json.loads(sessions(capsys, "--json")) == []


def test_live_session_in_the_table(
    capsys: pytest.CaptureFixture[str], runtime_dir: Path
) -> None:
    with Session("tests-trio-tcp", command=["pytest", "tests", "-k", "a b"]) as s:
        out = sessions(capsys)
        (row,) = [line for line in out.splitlines() if s.id in line]
        assert "live" in row
        assert str(os.getpid()) in row
        assert str(s.port) in row
        assert str(s.bindspace) in row
        assert "pytest tests -k 'a b'" in row
        (data,) = json.loads(sessions(capsys, "--json"))
        assert data["id"] == s.id
        assert data["state"] == "live"
        assert data["port"] == s.port
        assert data["bindspace"] == str(s.bindspace)
        assert data["age"] >= 0


def test_stale_session_is_listed_then_pruned(
    capsys: pytest.CaptureFixture[str], runtime_dir: Path, python: str
) -> None:
    opened = killed_session(python)
    (data,) = json.loads(sessions(capsys, "--json"))
    assert (data["id"], data["state"]) == (opened["id"], "stale")
    assert "harness sessions --prune" in sessions(capsys)

    out = sessions(capsys, "--prune")
    assert "Pruned 1 of 1" in out
    assert opened["id"] in out
    assert "removed" in out
    assert not Path(opened["bindspace"]).exists()
    assert sessions(capsys).startswith("No sessions")
    assert sessions(capsys, "--prune").startswith("Nothing to prune")


def test_prune_keeps_leftovers_and_says_what_next(
    capsys: pytest.CaptureFixture[str], runtime_dir: Path, python: str
) -> None:
    opened = killed_session(python, "leave-socket")
    out = sessions(capsys, "--prune")
    assert "kept" in out
    assert "holds 1 file(s)" in out
    assert f"harness check {opened['id']}" in out
    assert "harness reap --stale" in out
    (action,) = json.loads(sessions(capsys, "--prune", "--json"))
    assert action["action"] == "kept"
    assert Path(opened["bindspace"], "tractor", "actor@7.sock").exists()


def test_leaked_session_is_listed_and_never_pruned(
    capsys: pytest.CaptureFixture[str], runtime_dir: Path
) -> None:
    session = Session("leaky").open()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(session.socket_dir / "a@1.sock"))
    session.close(exit_status=1)
    (data,) = json.loads(sessions(capsys, "--json"))
    assert data["state"] == "leaked"
    assert data["leak_count"] == 1
    assert "harness check" in sessions(capsys)
    assert sessions(capsys, "--prune").startswith("Nothing to prune")
    assert SessionStore(runtime_dir).read(session.id).closed_at is not None


def test_orphan_bindspace_is_listed(
    capsys: pytest.CaptureFixture[str], runtime_dir: Path
) -> None:
    orphan = runtime_dir / "tractor" / "opening-0123abcd"
    orphan.mkdir(parents=True)
    (data,) = json.loads(sessions(capsys, "--json"))
    assert (data["id"], data["state"]) == ("opening-0123abcd", "orphan")
    assert data["bindspace"] == str(orphan)
    # Young: maybe a session that is opening right now, so not pruned yet.
    assert sessions(capsys, "--prune").startswith("Nothing to prune")
    past = time.time() - 3600
    os.utime(orphan, (past, past))
    assert "removed" in sessions(capsys, "--prune")
    assert not orphan.exists()


def test_help_explains_the_states(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["sessions", "--help"])
    out = capsys.readouterr().out
    for state in ("live", "stale", "leaked", "orphan", "--prune"):
        assert state in out
