"""The leak check on real leaks: processes, socket files and listeners."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import msgspec
import psutil
import pytest
from leak_sessions import (
    PYTHON,
    TCP_LISTENER,
    SessionFactory,
    free_port,
    wait_for,
)

from harness.attribution import ProcessTable, ProcInfo, attribute, scan_processes
from harness.leaks import LeakReport, check_leaks, probe_socket, socket_files
from harness.procfs import read_tcp_listeners, read_unix_sockets
from harness.records import SessionRecord


def by_pid(report: LeakReport) -> dict[int, list[str]]:
    return {p.pid: p.how for p in report.processes}


# ------------------------------------------------------------------ /proc


def test_unix_table_shows_a_listener_and_not_an_unbound_file(tmp_path: Path) -> None:
    path = f"/tmp/hl-{os.getpid()}.sock"
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(path)
        listener.listen()
        socks = read_unix_sockets()[path]
        assert any(s.listening for s in socks)
        assert probe_socket(path) == "live"
        listener.close()
        # The file outlives its listener: a stale socket file.
        assert path not in read_unix_sockets()
        assert probe_socket(path) == "stale"
    finally:
        listener.close()
        os.unlink(path)
    assert probe_socket(path) is None


def test_tcp_table_shows_listeners_on_v4_and_v6() -> None:
    v4 = socket.socket()
    v4.bind(("127.0.0.1", 0))
    v4.listen()
    port = v4.getsockname()[1]
    try:
        found = read_tcp_listeners(port)
        assert [(x.host, x.port, x.family) for x in found] == [
            ("127.0.0.1", port, "tcp")
        ]
        if socket.has_ipv6:
            v6 = socket.socket(socket.AF_INET6)
            try:
                v6.bind(("::1", port))
            except OSError:
                pytest.skip("no IPv6 loopback here")
            v6.listen()
            try:
                hosts = {(x.host, x.family) for x in read_tcp_listeners(port)}
                assert hosts == {("127.0.0.1", "tcp"), ("::1", "tcp6")}
            finally:
                v6.close()
    finally:
        v4.close()
    assert read_tcp_listeners(port) == []


def test_socket_files_are_found_recursively_and_symlinks_not_followed(
    runtime_dir: Path,
) -> None:
    root = runtime_dir / "bs"
    (root / "tractor").mkdir(parents=True)
    outside = runtime_dir / "outside"
    outside.mkdir()
    paths = [root / "a.sock", root / "tractor" / "b.sock", outside / "c.sock"]
    for path in paths:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    (root / "plain-file").write_text("not a socket")
    (root / "link").symlink_to(outside)
    assert socket_files(root) == [str(paths[0]), str(paths[1])]
    assert socket_files(runtime_dir / "missing") == []


# ------------------------------------------------------------ attribution


def test_clean_stale_session_reports_nothing(sessions: SessionFactory) -> None:
    session = sessions()
    report = check_leaks(session.record)
    assert report.state == "stale"
    assert not report.owner_alive
    assert not report.leaked
    assert report.processes == report.sockets == report.listeners == []
    assert report.scanned > 0


def test_double_forked_daemon_is_found_by_its_envelope(
    sessions: SessionFactory,
) -> None:
    session = sessions()
    pid = session.daemon()
    assert psutil.Process(pid).ppid() != os.getpid()  # orphaned, re-parented
    report = check_leaks(session.record)
    assert by_pid(report) == {pid: ["envelope"]}
    assert report.leak_count == 1


def test_setsid_child_is_found_by_its_envelope(sessions: SessionFactory) -> None:
    session = sessions()
    proc = session.spawn(["setsid", "sleep", "60"])
    wait_for(lambda: psutil.Process(proc.pid).name() == "sleep")
    report = check_leaks(session.record)
    assert by_pid(report)[proc.pid] == ["envelope"]
    leaked = report.processes[0]
    assert leaked.cmdline == ["sleep", "60"]
    assert leaked.ppid == os.getpid()
    assert leaked.user
    assert leaked.age >= 0


def test_env_i_child_holding_the_uds_is_found_by_the_socket(
    sessions: SessionFactory,
) -> None:
    session = sessions()
    proc, path = session.uds_listener("registry@1616.sock", env={})
    assert "_TRACTOR_RT_VARS" not in psutil.Process(proc.pid).environ()
    report = check_leaks(session.record)
    assert by_pid(report) == {proc.pid: ["socket"]}
    assert report.processes[0].holds == [str(path)]
    [sock] = report.sockets
    assert (sock.path, sock.state, sock.holders) == (str(path), "live", [proc.pid])


def test_sigkilled_listener_leaves_a_stale_socket_file(
    sessions: SessionFactory,
) -> None:
    session = sessions()
    proc, path = session.uds_listener("actor@4242.sock")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    report = check_leaks(session.record)
    assert report.processes == []
    [sock] = report.sockets
    assert (sock.path, sock.state, sock.holders) == (str(path), "stale", [])
    assert report.leaked


def test_child_listening_on_the_session_port_is_found(
    sessions: SessionFactory,
) -> None:
    port = free_port()
    session = sessions(port=port)
    proc = session.python(TCP_LISTENER, str(port), env={}, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.readline()
    report = check_leaks(session.record)
    assert by_pid(report) == {proc.pid: ["port"]}
    assert report.processes[0].holds == [f"tcp 127.0.0.1:{port}"]
    [listener] = report.listeners
    assert (listener.address, listener.pids) == (f"127.0.0.1:{port}", [proc.pid])


def test_descendants_of_a_live_owner_are_found_and_the_owner_is_not(
    sessions: SessionFactory,
) -> None:
    # The child drops the envelope: only its parentage ties it to the session.
    session = sessions(owner_children=["exec env -i sleep 60"])
    assert session.owner is not None
    [child] = psutil.Process(session.owner.pid).children()
    report = check_leaks(session.record)
    assert report.state == "live"
    assert report.owner_alive
    assert by_pid(report) == {child.pid: ["descendant"]}
    assert session.owner.pid not in by_pid(report)


def test_a_process_found_several_ways_lists_each(sessions: SessionFactory) -> None:
    session = sessions(owner_children=[])
    proc, _ = session.uds_listener("both.sock")
    # The listener is the test's child, not the owner's: envelope + socket.
    assert by_pid(check_leaks(session.record))[proc.pid] == ["envelope", "socket"]


def test_zombies_are_reported_but_not_counted(sessions: SessionFactory) -> None:
    session = sessions(owner_children=["exec true"])
    assert session.owner is not None
    [child] = psutil.Process(session.owner.pid).children()
    wait_for(lambda: child.status() == psutil.STATUS_ZOMBIE)
    report = check_leaks(session.record)
    [zombie] = report.processes
    assert (zombie.pid, zombie.status, zombie.how) == (
        child.pid,
        "zombie",
        ["descendant"],
    )
    assert report.zombies == [zombie]
    assert report.leak_count == 0
    assert not report.leaked


def test_two_sessions_never_see_each_others_processes_or_sockets(
    sessions: SessionFactory,
) -> None:
    port_a, port_b = free_port(), free_port()
    leaky = sessions("leaky", port=port_a)
    other = sessions("other", port=port_b, owner_children=["exec sleep 60"])
    leaky_pid = leaky.daemon()
    leaky_listener, _ = leaky.uds_listener("a.sock", env={})
    other_daemon = other.daemon()
    other_listener, other_path = other.uds_listener("b.sock", env={})
    other_tcp = other.python(TCP_LISTENER, str(port_b), stdout=subprocess.PIPE)
    assert other_tcp.stdout is not None
    other_tcp.stdout.readline()

    report = check_leaks(leaky.record)
    assert set(by_pid(report)) == {leaky_pid, leaky_listener.pid}
    assert [s.path for s in report.sockets] == [str(leaky.bindspace / "tractor/a.sock")]
    assert report.listeners == []

    other_report = check_leaks(other.record)
    assert leaky_pid not in by_pid(other_report)
    assert {other_daemon, other_listener.pid, other_tcp.pid} <= set(
        by_pid(other_report)
    )
    assert str(other_path) in [s.path for s in other_report.sockets]


def test_a_process_of_the_user_outside_any_session_is_not_reported(
    sessions: SessionFactory,
) -> None:
    session = sessions()
    session.daemon()
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        report = check_leaks(session.record)
        assert bystander.pid not in by_pid(report)
    finally:
        bystander.kill()
        bystander.wait()


def test_port_listener_of_another_session_is_skipped_not_attributed(
    sessions: SessionFactory,
) -> None:
    # A port is leased again once a session ends: the new holder carries its
    # own session's envelope, and must not count for the old session.
    port = free_port()
    old = sessions("old", port=port)
    new = sessions("new", port=port)
    proc = new.python(TCP_LISTENER, str(port), stdout=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.readline()
    report = check_leaks(old.record)
    assert report.processes == []
    [skipped] = report.skipped
    assert (skipped.pid, skipped.how) == (proc.pid, ["port"])
    assert new.id in skipped.reason


def test_a_malformed_envelope_naming_the_session_is_skipped(
    sessions: SessionFactory,
) -> None:
    session = sessions()
    env = {**session.env, "_TRACTOR_RT_VARS": f"{{'session': '{session.id}',"}
    proc = session.spawn(["sleep", "60"], env=env)
    report = check_leaks(session.record)
    assert report.processes == []
    [skipped] = report.skipped
    assert skipped.pid == proc.pid
    assert skipped.how == ["envelope"]
    assert "malformed envelope" in skipped.reason


def test_owner_pid_recycled_by_an_unrelated_process_is_not_the_owner(
    sessions: SessionFactory,
) -> None:
    # The record's owner pid now belongs to a process started at another
    # time: neither it nor its children belong to the session.
    bystander = subprocess.Popen(
        [
            PYTHON,
            "-c",
            "import subprocess, time; "
            "subprocess.Popen(['sleep', '60']); time.sleep(60)",
        ]
    )
    try:
        wait_for(lambda: psutil.Process(bystander.pid).children())
        session = sessions()
        record = msgspec.structs.replace(
            session.record,
            owner_pid=bystander.pid,
            owner_create_time=psutil.Process(bystander.pid).create_time() - 5,
        )
        report = check_leaks(record)
        assert not report.owner_alive
        assert report.processes == []
    finally:
        for child in psutil.Process(bystander.pid).children():
            child.kill()
        bystander.kill()
        bystander.wait()


def test_exclude_pids_and_the_checker_itself_are_never_reported(
    sessions: SessionFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = sessions()
    helper = session.spawn(["sleep", "60"])
    assert by_pid(check_leaks(session.record, exclude_pids=[helper.pid])) == {}
    # A check run from inside the session does not report itself.
    monkeypatch.setenv("_TRACTOR_RT_VARS", session.env["_TRACTOR_RT_VARS"])
    assert os.getpid() not in by_pid(check_leaks(session.record))


def test_processes_of_other_users_are_skipped_with_the_reason() -> None:
    # A synthetic table: pid 2 is the owner's child but belongs to uid 4242.
    me = os.getuid()
    procs = {
        1: ProcInfo(1, 0, me, 100.0, "sleeping", "owner"),
        2: ProcInfo(2, 1, me + 4242, 101.0, "sleeping", "other"),
        3: ProcInfo(3, 2, me, 102.0, "sleeping", "grandchild"),
    }
    table = ProcessTable(procs, {0: [1], 1: [2], 2: [3]})
    record = msgspec.json.decode(
        msgspec.json.encode(
            {
                "id": "synthetic-00000000",
                "name": "synthetic",
                "owner_pid": 1,
                "owner_create_time": 100.0,
                "uid": me,
                "runtime_dir": "/nonexistent",
                "bindspace": "/nonexistent/tractor/synthetic-00000000",
            }
        ),
        type=SessionRecord,
    )
    found = attribute(record, table, holders={2: {"port"}})
    assert found.owner_alive
    assert found.found == {}
    [skipped] = found.skipped
    assert skipped.pid == 2
    assert sorted(skipped.how) == ["descendant", "port"]
    assert f"uid {me + 4242}" in skipped.reason
    assert found.other_users == 1


def test_scan_sees_this_process_with_its_identity() -> None:
    table = scan_processes()
    me = table.procs[os.getpid()]
    assert me.ppid == os.getppid()
    assert me.uid == os.getuid()
    assert table.same_process(os.getpid(), psutil.Process().create_time())
    assert not table.same_process(os.getpid(), me.create_time - 1)
    assert os.getpid() in table.children[os.getppid()]


def test_report_encodes_to_json_and_back(sessions: SessionFactory) -> None:
    session = sessions()
    session.daemon()
    report = check_leaks(session.record)
    data = msgspec.json.decode(msgspec.json.encode(report))
    assert data["leak_count"] == 1
    assert data["processes"][0]["how"] == ["envelope"]
    again = msgspec.json.decode(msgspec.json.encode(report), type=LeakReport)
    assert again == report
