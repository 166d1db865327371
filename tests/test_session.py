"""Sessions: lease + bindspace + envelope + record, open and closed for real."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.ports import lease_port, port_is_leased
from harness.records import SessionStore, record_state
from harness.rtvars import RT_VARS_ENV, load_rtvars, read_raw_rtvars
from harness.session import Session, prune_sessions
from harness.session_id import is_session_id, new_session_id, sanitize_name


@dataclass
class Report:
    """The one thing Session.close reads of a leak report."""

    leak_count: int


# ---------------------------------------------------------------- ids


def test_session_id_shape() -> None:
    sid = new_session_id("tests-trio-tcp")
    assert sid.startswith("tests-trio-tcp-")
    assert is_session_id(sid)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("tests-trio-tcp", "tests-trio-tcp"),
        ("tests(trio, tcp)", "tests-trio-tcp"),
        ("../../etc", "etc"),
        ("--rm -rf", "rm--rf"),
        ("", "session"),
        ("///", "session"),
        ("a" * 100, "a" * 40),
    ],
)
def test_sanitize_name(name: str, expected: str) -> None:
    assert sanitize_name(name) == expected


def test_session_id_fits_a_budget() -> None:
    sid = new_session_id("a-very-long-nox-session-name", max_len=20)
    assert len(sid) == 20
    assert is_session_id(sid)


# ---------------------------------------------------------------- open/close


def test_clean_session_leaves_nothing(runtime_dir: Path) -> None:
    with Session("clean", backend="trio", command=["pytest", "-x"]) as session:
        sid, port, bindspace = session.id, session.port, session.bindspace
        record = session.store.read(sid)
        assert record.owner_pid == os.getpid()
        assert record.port == port
        assert record.bindspace == str(bindspace)
        assert record.command == ["pytest", "-x"]
        assert record_state(record) == "live"
        assert port_is_leased(port)
        assert bindspace.parent == runtime_dir / "tractor"
    assert not bindspace.exists()
    assert not SessionStore(runtime_dir).path(sid).exists()
    assert not port_is_leased(port)
    assert list((runtime_dir / "tractor").iterdir()) == []


def test_tcp_envelope(runtime_dir: Path) -> None:
    with Session("env", backend="mp_spawn") as session:
        rt = session.rtvars
        assert rt.session == session.id
        assert rt._registry_addrs == [("127.0.0.1", session.port)]
        assert rt._enable_tpts == ["tcp"]
        assert rt.tpt_proto == "tcp"
        assert rt.spawn_backend == "mp_spawn"
        assert rt.bindspace == str(session.bindspace)


def test_uds_envelope_points_into_the_socket_folder(runtime_dir: Path) -> None:
    with Session("uds", transport="uds") as session:
        folder, name = session.rtvars._registry_addrs[0]
        assert folder == str(session.bindspace / "tractor")
        assert name == f"registry@{session.port}.sock"
        assert session.rtvars._enable_tpts == ["uds"]
        # The address is bindable as it stands.
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(os.path.join(folder, str(name)))


def test_unknown_transport_is_refused() -> None:
    with pytest.raises(HarnessError, match="unknown transport 'quic'"):
        Session(transport="quic")


def test_env_reaches_a_child(runtime_dir: Path, python: str) -> None:
    script = (
        "import json, os\n"
        "print(json.dumps({k: os.environ.get(k) for k in "
        f"('XDG_RUNTIME_DIR', 'HARNESS_RUNTIME_DIR', {RT_VARS_ENV!r})}}))"
    )
    base = {"PATH": os.environ["PATH"], RT_VARS_ENV: "{'session': 'outer-00000000'}"}
    with Session("child", rtvars={"loglevel": "info", "x_future": 1}) as session:
        out = subprocess.run(
            [python, "-c", script],
            env=session.env(base),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        seen = json.loads(out)
        assert seen["XDG_RUNTIME_DIR"] == str(session.bindspace)
        assert seen["HARNESS_RUNTIME_DIR"] == str(runtime_dir)
        env = {RT_VARS_ENV: seen[RT_VARS_ENV]}
        assert load_rtvars(env) == session.rtvars
        assert load_rtvars(env).loglevel == "info"
        assert read_raw_rtvars(env)["x_future"] == 1


def test_extra_rtvars_cannot_change_the_identity(runtime_dir: Path) -> None:
    extra = {
        "session": "someone-else",
        "bindspace": "/",
        "_enable_tpts": ["tcp", "uds"],
    }
    with Session("ident", rtvars=extra) as session:
        assert session.rtvars.session == session.id
        assert session.rtvars.bindspace == str(session.bindspace)
        assert session.rtvars._enable_tpts == ["tcp", "uds"]


def test_update_record(runtime_dir: Path) -> None:
    with Session("upd") as session:
        session.update_record(isolate=["net"], netns="net:[4026531840]")
        assert session.store.read(session.id).isolate == ["net"]
        with pytest.raises(HarnessError, match="no field 'colour'"):
            session.update_record(colour="red")


def test_attributes_need_an_open_session() -> None:
    session = Session("closed")
    with pytest.raises(HarnessError, match="open"):
        _ = session.port
    session.close()  # closing a session never opened is harmless


def test_socket_left_behind_is_kept(runtime_dir: Path) -> None:
    session = Session("leaky").open()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(session.socket_dir / "actor@1.sock"))
    sock.close()
    session.close(exit_status=0)
    assert session.leak_count == 1
    record = SessionStore(runtime_dir).read(session.id)
    assert record.closed_at is not None
    assert record.leak_count == 1
    assert record.exit_status == 0
    assert record_state(record) == "leaked"
    assert (session.bindspace / "tractor" / "actor@1.sock").exists()
    assert not port_is_leased(record.port or 0)


def test_leak_report_decides(runtime_dir: Path) -> None:
    with Session("rep") as session:
        (session.bindspace / "tractor" / "notes.txt").write_text("not a socket")
        session.leaks = Report(leak_count=0)
    assert not session.bindspace.exists()

    session = Session("rep2").open()
    session.close(leaks=Report(leak_count=3))
    assert SessionStore(runtime_dir).read(session.id).leak_count == 3
    assert session.bindspace.exists()


def test_failed_open_leaves_nothing() -> None:
    deep = Path(tempfile.mkdtemp(prefix="d" * 64, dir="/tmp"))
    try:
        with pytest.raises(HarnessError, match="AF_UNIX limit") as info:
            Session("deep", runtime_dir=deep).open()
        assert "HARNESS_RUNTIME_DIR" in str(info.value)
        assert list((deep / "tractor").iterdir()) == []
        assert SessionStore(deep).list() == []
    finally:
        subprocess.run(["rm", "-rf", str(deep)], check=True)


def test_long_names_are_shortened_to_fit(runtime_dir: Path) -> None:
    with Session("x" * 200) as session:
        assert len(session.id) <= 49
        sockets = session.socket_dir
        assert 107 - len(str(sockets)) - 1 >= 40


def test_a_taken_id_is_drawn_again(
    runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    suffixes = iter(["deadbeef", "deadbeef", "cafef00d"])
    monkeypatch.setattr("harness.session_id.random_suffix", lambda: next(suffixes))
    with Session("dup") as first, Session("dup", prune=False) as second:
        assert first.id == "dup-deadbeef"
        assert second.id == "dup-cafef00d"


def test_ids_stay_unique_in_a_burst(runtime_dir: Path) -> None:
    sessions = [Session("burst").open() for _ in range(30)]
    try:
        assert len({s.id for s in sessions}) == 30
        assert len({s.port for s in sessions}) == 30
    finally:
        for s in sessions:
            s.close()


# ---------------------------------------------------------------- many processes

OWNER = textwrap.dedent(
    """
    import json, socket, sys
    from harness.session import Session
    with Session(sys.argv[1]) as s:
        probe = socket.socket()
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", s.port))
        probe.listen()
        probe.close()
        print(json.dumps({"id": s.id, "port": s.port, "bindspace": str(s.bindspace)}),
              flush=True)
        sys.stdin.readline()
    """
)


def _start_owner(python: str, name: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [python, "-c", OWNER, name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_concurrent_sessions_are_distinct(runtime_dir: Path, python: str) -> None:
    """Eight processes open a session with the same name at once."""
    owners = [_start_owner(python, "same-nox-session") for _ in range(8)]
    try:
        opened = [json.loads(p.stdout.readline()) for p in owners]  # type: ignore[union-attr]
        # All are open at the same time here: each waits for its stdin.
        assert len({o["id"] for o in opened}) == 8
        assert len({o["port"] for o in opened}) == 8
        assert len({o["bindspace"] for o in opened}) == 8
        listed = {r.id for r in SessionStore(runtime_dir).list()}
        assert listed == {o["id"] for o in opened}
    finally:
        for p in owners:
            p.communicate("\n", timeout=30)
    assert all(p.returncode == 0 for p in owners)
    assert SessionStore(runtime_dir).list() == []
    assert list((runtime_dir / "tractor").iterdir()) == []


def test_killed_owner_is_recovered(runtime_dir: Path, python: str) -> None:
    owner = _start_owner(python, "doomed")
    opened = json.loads(owner.stdout.readline())  # type: ignore[union-attr]
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    owner.stdin.close()  # type: ignore[union-attr]
    owner.stdout.close()  # type: ignore[union-attr]

    store = SessionStore(runtime_dir)
    record = store.read(opened["id"])
    assert record_state(record) == "stale"
    # The kernel dropped the lock with the owner: the port leases again.
    assert not port_is_leased(opened["port"])
    with lease_port(port_range=(opened["port"], opened["port"])) as lease:
        assert lease.port == opened["port"]

    actions = prune_sessions(runtime_dir)
    assert [(a.session_id, a.action) for a in actions] == [(opened["id"], "removed")]
    assert store.list() == []
    assert not Path(opened["bindspace"]).exists()


def test_killed_owner_with_leftovers_is_kept(runtime_dir: Path, python: str) -> None:
    owner = _start_owner(python, "doomed")
    opened = json.loads(owner.stdout.readline())  # type: ignore[union-attr]
    leftover = Path(opened["bindspace"]) / "tractor" / "actor@99.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(leftover))
    owner.kill()
    owner.communicate()

    actions = prune_sessions(runtime_dir)
    assert [(a.action, a.reason) for a in actions] == [
        ("kept", "its bindspace holds 1 file(s)")
    ]
    assert leftover.exists()
    assert record_state(SessionStore(runtime_dir).read(opened["id"])) == "stale"


def test_opening_prunes_stale_sessions(runtime_dir: Path, python: str) -> None:
    owner = _start_owner(python, "doomed")
    opened = json.loads(owner.stdout.readline())  # type: ignore[union-attr]
    owner.kill()
    owner.communicate()
    with Session("next"):
        assert [r.id for r in SessionStore(runtime_dir).list()] != [opened["id"]]
        assert not Path(opened["bindspace"]).exists()


def test_orphan_bindspace_is_pruned_after_the_grace(runtime_dir: Path) -> None:
    root = runtime_dir / "tractor"
    root.mkdir(mode=0o700)
    young = root / "young-0000aaaa"
    old = root / "old-0000bbbb"
    young.mkdir()
    old.mkdir()
    (old / "tractor").mkdir()
    past = time.time() - 3600
    os.utime(old, (past, past))
    actions = prune_sessions(runtime_dir)
    assert [(a.session_id, a.action) for a in actions] == [("old-0000bbbb", "removed")]
    assert young.exists()
    assert not old.exists()


def test_live_and_leaked_sessions_are_never_pruned(runtime_dir: Path) -> None:
    leaked = Session("leaked").open()
    leaked.close(leaks=Report(leak_count=1))
    with Session("live") as live:
        assert prune_sessions(runtime_dir) == []
        assert live.bindspace.exists()
    assert leaked.bindspace.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux")
def test_subreaper_flag(runtime_dir: Path, python: str) -> None:
    script = (
        "from harness.session import Session\n"
        "from harness.subreaper import is_subreaper\n"
        "before = is_subreaper()\n"
        "with Session('sr', subreaper=True):\n"
        "    print(before, is_subreaper())\n"
    )
    out = subprocess.run(
        [python, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["False", "True"]


@pytest.mark.slow
def test_stress_many_owners_some_killed(runtime_dir: Path, python: str) -> None:
    """Forty owners at once; every third is SIGKILLed; prune recovers all."""
    owners = [_start_owner(python, "stress") for _ in range(40)]
    opened = [json.loads(p.stdout.readline()) for p in owners]  # type: ignore[union-attr]
    assert len({o["port"] for o in opened}) == 40
    assert len({o["id"] for o in opened}) == 40
    for index, proc in enumerate(owners):
        if index % 3 == 0:
            proc.kill()
            proc.communicate()
        else:
            proc.communicate("\n", timeout=60)
    actions = prune_sessions(runtime_dir)
    assert len(actions) == len(range(0, 40, 3))
    assert all(a.action == "removed" for a in actions)
    assert SessionStore(runtime_dir).list() == []
    assert list((runtime_dir / "tractor").iterdir()) == []
    assert not any(port_is_leased(o["port"]) for o in opened)
