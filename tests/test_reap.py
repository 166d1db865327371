"""Reaping real leaks, and the leak modes the runner settles a session with."""

from __future__ import annotations

import io
import os
import signal
import subprocess
from pathlib import Path

import msgspec
import psutil
import pytest
from leak_sessions import (
    STUBBORN,
    TCP_LISTENER,
    SessionFactory,
    alive,
    free_port,
    wait_for,
)

from harness import exit_codes
from harness.errors import HarnessError
from harness.leak_modes import default_mode, parse_mode, settle_leaks
from harness.leaks import LeakedProcess, check_leaks
from harness.reap import reap_session, terminate
from harness.records import SessionStore, record_state

GRACE = 0.3


def outcomes(result: object) -> dict[int, tuple[str, str | None]]:
    return {p.pid: (p.outcome, p.signal) for p in result.processes}  # type: ignore[attr-defined]


def test_every_kind_of_leak_is_reaped_and_nothing_is_left_on_disk(
    sessions: SessionFactory, runtime_dir: Path
) -> None:
    port = free_port()
    session = sessions(port=port)
    daemon = session.daemon()
    setsid = session.spawn(["setsid", "sleep", "60"])
    holder, holder_path = session.uds_listener("registry@1616.sock", env={})
    dead, dead_path = session.uds_listener("actor@1.sock")
    dead.kill()
    dead.wait()
    listener = session.python(TCP_LISTENER, str(port), env={}, stdout=subprocess.PIPE)
    assert listener.stdout is not None
    listener.stdout.readline()

    result = reap_session(session.record, grace=GRACE)

    for pid in (daemon, setsid.pid, holder.pid, listener.pid):
        assert not alive(pid)
        assert outcomes(result)[pid] == ("reaped", "SIGINT")
    assert sorted(result.removed_sockets) == sorted([str(holder_path), str(dead_path)])
    assert result.clean
    assert result.removed_bindspace
    assert result.removed_record
    assert not session.bindspace.exists()
    assert SessionStore(runtime_dir).list() == []
    assert list((runtime_dir / "tractor").iterdir()) == []


def test_a_clean_stale_session_leaves_nothing_on_disk(
    sessions: SessionFactory, runtime_dir: Path
) -> None:
    session = sessions()
    result = reap_session(session.record, grace=GRACE)
    assert result.processes == []
    assert result.clean
    assert not session.bindspace.exists()
    assert not SessionStore(runtime_dir).path(session.id).exists()


def test_escalation_reaches_sigterm_and_sigkill(sessions: SessionFactory) -> None:
    session = sessions()
    deaf_to_int = session.python(STUBBORN, "SIGINT", stdout=subprocess.PIPE)
    deaf_to_both = session.python(STUBBORN, "SIGINT", "SIGTERM", stdout=subprocess.PIPE)
    for proc in (deaf_to_int, deaf_to_both):
        assert proc.stdout is not None
        proc.stdout.readline()
    result = reap_session(session.record, grace=GRACE)
    assert outcomes(result) == {
        deaf_to_int.pid: ("reaped", "SIGTERM"),
        deaf_to_both.pid: ("reaped", "SIGKILL"),
    }
    assert result.clean


def test_a_whole_tree_is_reaped_leaves_first(
    sessions: SessionFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = sessions(owner_children=["exec sleep 60", "exec sleep 61"])
    assert session.owner is not None
    children = [c.pid for c in psutil.Process(session.owner.pid).children()]
    report = check_leaks(session.record)
    leaves = [p for p in report.processes if p.pid in children]
    assert len(leaves) == 2
    # The owner is never a leak; here it stands in for a leaked parent, to
    # see that its children are signalled before it.
    parent = LeakedProcess(
        pid=session.owner.pid,
        ppid=os.getpid(),
        create_time=psutil.Process(session.owner.pid).create_time(),
        age=0,
        uid=os.getuid(),
        user="",
        name="owner",
        cmdline=[],
        status="sleeping",
        how=["envelope"],
    )
    sent: list[int] = []
    original = psutil.Process.send_signal

    def recording(self: psutil.Process, sig: int) -> None:
        sent.append(self.pid)
        original(self, sig)

    monkeypatch.setattr(psutil.Process, "send_signal", recording)
    result = terminate([parent, *leaves], grace=GRACE)
    assert {r.outcome for r in result} == {"reaped"}
    assert sent[-1] == session.owner.pid
    assert set(sent[:2]) == set(children)


def test_a_recycled_pid_is_never_signalled() -> None:
    # A live, unrelated process whose pid is recorded with another creation
    # time, as when the leaked process died and the kernel reused its pid.
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        real = psutil.Process(bystander.pid)
        ghost = LeakedProcess(
            pid=bystander.pid,
            ppid=os.getpid(),
            create_time=real.create_time() - 3.0,
            age=3.0,
            uid=os.getuid(),
            user="",
            name="sleep",
            cmdline=["sleep", "60"],
            status="sleeping",
            how=["envelope"],
        )
        [outcome] = terminate([ghost], grace=GRACE)
        assert outcome.outcome == "gone"
        assert outcome.signal is None
        assert real.is_running()
        assert real.status() != psutil.STATUS_ZOMBIE
    finally:
        bystander.kill()
        bystander.wait()


def test_other_sessions_and_bystanders_survive_a_reap(sessions: SessionFactory) -> None:
    port = free_port()
    leaky = sessions("leaky")
    other = sessions("other", port=port, owner_children=["exec sleep 60"])
    leaky_daemon = leaky.daemon()
    other_daemon = other.daemon()
    other_holder, other_path = other.uds_listener("b.sock", env={})
    other_tcp = other.python(TCP_LISTENER, str(port), stdout=subprocess.PIPE)
    assert other_tcp.stdout is not None
    other_tcp.stdout.readline()
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        result = reap_session(leaky.record, grace=GRACE)
        assert set(outcomes(result)) == {leaky_daemon}
        assert not alive(leaky_daemon)
        assert other.owner is not None
        for pid in (other_daemon, other_holder.pid, other_tcp.pid, other.owner.pid):
            assert alive(pid)
        assert alive(bystander.pid)
        assert other_path.exists()
        assert record_state(other.record) == "live"
    finally:
        bystander.kill()
        bystander.wait()


def test_a_live_socket_file_stays_until_its_holder_is_gone(
    sessions: SessionFactory,
) -> None:
    # The holder carries another session's envelope, so it is never reaped
    # for this one; its file in this bindspace stays while it listens.
    session = sessions()
    other = sessions("other")
    path = session.bindspace / "held.sock"
    proc = other.python(
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen()\n"
        "time.sleep(60)",
        str(path),
    )
    wait_for(path.exists)
    result = reap_session(session.record, grace=GRACE)
    assert alive(proc.pid)
    assert result.kept_sockets == [str(path)]
    assert not result.clean
    assert not result.removed_bindspace
    assert path.exists()

    proc.kill()
    proc.wait()
    again = reap_session(session.record, grace=GRACE)
    assert again.removed_sockets == [str(path)]
    assert again.clean
    assert not session.bindspace.exists()


def test_dry_run_changes_nothing(sessions: SessionFactory, runtime_dir: Path) -> None:
    session = sessions()
    daemon = session.daemon()
    _, path = session.uds_listener("gone.sock")
    session.popens[-1].kill()
    session.popens[-1].wait()
    result = reap_session(session.record, grace=GRACE, dry_run=True)
    assert result.dry_run
    assert result.processes == []
    assert any(str(daemon) in step for step in result.plan)
    assert f"remove stale socket file {path}" in result.plan
    assert alive(daemon)
    assert path.exists()
    assert SessionStore(runtime_dir).path(session.id).exists()


def test_the_bindspace_of_a_forged_record_is_never_removed(
    sessions: SessionFactory, runtime_dir: Path
) -> None:
    session = sessions()
    elsewhere = runtime_dir / "precious"
    elsewhere.mkdir()
    (elsewhere / "data").write_text("keep me")
    forged = msgspec.structs.replace(session.record, bindspace=str(elsewhere))
    result = reap_session(forged, grace=GRACE)
    assert not result.removed_bindspace
    assert (elsewhere / "data").read_text() == "keep me"


# ------------------------------------------------------------------ modes


def test_default_mode_follows_ci() -> None:
    assert default_mode({"CI": "true"}) == "fail"
    assert default_mode({"CI": "1"}) == "fail"
    assert default_mode({"CI": "false"}) == "warn"
    assert default_mode({}) == "warn"
    assert parse_mode(" Reap ") == "reap"
    with pytest.raises(HarnessError, match=r"'kill'.*fail, warn, reap"):
        parse_mode("kill")


@pytest.mark.parametrize(
    ("mode", "command_status", "expected"),
    [
        ("fail", 0, exit_codes.LEAKED),
        ("fail", 1, 1),
        ("warn", 0, 0),
        ("warn", 3, 3),
    ],
)
def test_fail_and_warn_keep_the_evidence(
    sessions: SessionFactory,
    tmp_path: Path,
    mode: str,
    command_status: int,
    expected: int,
) -> None:
    session = sessions()
    daemon = session.daemon()
    report_path = tmp_path / "leaks.json"
    stream = io.StringIO()
    settled = settle_leaks(
        session.record,
        mode,  # type: ignore[arg-type]
        report_path,
        command_status=command_status,
        stream=stream,
        write_record=True,
    )
    assert settled.exit_status == expected
    assert settled.keep_evidence
    assert settled.leak_count == 1
    assert alive(daemon)
    data = msgspec.json.decode(report_path.read_bytes())
    assert data["exit_status"] == expected
    assert data["report"]["processes"][0]["pid"] == daemon
    record = SessionStore(Path(session.record.runtime_dir)).read(session.id)
    assert record.closed_at is not None
    assert record.leak_count == 1
    assert record.report_path == str(report_path)
    assert record_state(record) == "leaked"
    text = stream.getvalue()
    assert f"harness reap {session.id}" in text
    assert str(daemon) in text


def test_reap_mode_reaps_and_keeps_the_command_status(
    sessions: SessionFactory, tmp_path: Path
) -> None:
    session = sessions()
    daemon = session.daemon()
    settled = settle_leaks(
        session.record,
        "reap",
        tmp_path / "r.json",
        command_status=0,
        grace=GRACE,
        stream=io.StringIO(),
    )
    assert not alive(daemon)
    assert settled.exit_status == 0
    assert settled.leak_count == 0
    assert not settled.keep_evidence
    assert settled.report.leak_count == 1
    assert settled.reap is not None
    assert outcomes(settled.reap)[daemon] == ("reaped", "SIGINT")


def test_reap_mode_fails_when_something_survives(
    sessions: SessionFactory, tmp_path: Path
) -> None:
    # A socket file held by another session's process cannot be reaped here.
    session = sessions()
    other = sessions("other")
    session.daemon()
    path = session.bindspace / "held.sock"
    other.python(
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen()\n"
        "time.sleep(60)",
        str(path),
    )
    wait_for(path.exists)
    settled = settle_leaks(
        session.record, "reap", None, grace=GRACE, stream=io.StringIO()
    )
    assert settled.exit_status == exit_codes.LEAKED
    assert settled.keep_evidence
    assert settled.leak_count == 1


def test_a_clean_session_settles_quietly(sessions: SessionFactory) -> None:
    session = sessions()
    stream = io.StringIO()
    settled = settle_leaks(session.record, "fail", None, stream=stream)
    assert settled.exit_status == 0
    assert not settled.keep_evidence
    assert stream.getvalue() == ""


def test_the_runner_excludes_its_helpers(sessions: SessionFactory) -> None:
    session = sessions()
    helper = session.spawn(["sleep", "60"])
    settled = settle_leaks(
        session.record,
        "reap",
        None,
        exclude_pids=[helper.pid],
        grace=GRACE,
        stream=io.StringIO(),
    )
    assert settled.leak_count == 0
    assert alive(helper.pid)
    helper.send_signal(signal.SIGKILL)
