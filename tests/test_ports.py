"""Port leases: real processes, real sockets, real lock files.

Every test leases from its own lease dir (``tmp_path``) unless it tests the
default one, so tests never see each other's leases or the host's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.ports import (
    LEASE_DIR_ENV,
    PORT_RANGE_ENV,
    PortLease,
    configured_port_range,
    default_port_range,
    lease_dir,
    lease_port,
    port_holder,
    port_is_leased,
)

NOBODY = 65534

# A process that leases N ports from a lease dir once told "go", proves each
# binds, prints them as JSON and holds them until its stdin closes.
HOLDER = textwrap.dedent(
    """
    import json, socket, sys
    from pathlib import Path
    from harness.ports import lease_port

    count, directory = int(sys.argv[1]), Path(sys.argv[2])
    print("ready", flush=True)
    sys.stdin.readline()
    held = [lease_port(lease_dir=directory) for _ in range(count)]
    unbindable = []
    for lease in held:
        sock = socket.socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(lease.address)
            sock.listen()
        except OSError as exc:
            unbindable.append([lease.port, exc.strerror])
        finally:
            sock.close()
    print(json.dumps({"ports": [l.port for l in held], "unbindable": unbindable}),
          flush=True)
    sys.stdin.read()
    """
)


@pytest.fixture
def leases(tmp_path: Path) -> Path:
    """A private lease dir for this test (created by the first lease)."""
    return tmp_path / "leases"


def _free_port(directory: Path) -> int:
    """A port that just passed the lease probes, released again."""
    with lease_port(lease_dir=directory) as lease:
        return lease.port


def _start_holders(python: str, count: int, each: int, directory: Path) -> list:
    procs = [
        subprocess.Popen(
            [python, "-c", HOLDER, str(each), str(directory)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    for proc in procs:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
    # Release them all at once, so they contend for the same ports.
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    return procs


def _collect(procs: list) -> tuple[Counter[int], list]:
    ports: Counter[int] = Counter()
    unbindable = []
    try:
        for proc in procs:
            line = proc.stdout.readline()
            assert line, f"holder {proc.pid} died: status {proc.wait()}"
            report = json.loads(line)
            ports.update(report["ports"])
            unbindable += report["unbindable"]
    finally:
        for proc in procs:
            proc.stdin.close()
            proc.wait(timeout=60)
    return ports, unbindable


# --- leasing ----------------------------------------------------------------


def test_granted_port_is_bindable_and_marked_leased(leases: Path) -> None:
    lease = lease_port(lease_dir=leases)
    try:
        assert lease.held
        assert lease.path == leases / f"{lease.port}.lock"
        assert port_is_leased(lease.port, lease_dir=leases)
        for reuse in (False, True):
            sock = socket.socket()
            if reuse:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(lease.address)
            sock.listen()
            sock.close()
        holder = port_holder(lease.port, lease_dir=leases)
        assert holder is not None
        assert holder.pid == os.getpid()
        assert holder.uid == os.getuid()
        assert holder.create_time is not None
    finally:
        lease.release()
    assert not lease.held
    assert not port_is_leased(lease.port, lease_dir=leases)
    assert port_holder(lease.port, lease_dir=leases) is None


def test_release_is_idempotent_and_context_manager_releases(leases: Path) -> None:
    with lease_port(lease_dir=leases) as lease:
        assert isinstance(lease, PortLease)
        assert "held" in repr(lease)
    assert not port_is_leased(lease.port, lease_dir=leases)
    lease.release()
    lease.release()
    assert "released" in repr(lease)
    # The lock file stays: deleting it would reopen the unlink race. It is
    # readable by all, which is all flock needs, and empty.
    assert lease.path.exists()
    assert stat.S_IMODE(lease.path.stat().st_mode) == 0o644
    assert lease.path.stat().st_size == 0


def test_port_is_free_again_after_release(leases: Path) -> None:
    port = _free_port(leases)
    with lease_port(port_range=(port, port), lease_dir=leases) as again:
        assert again.port == port


def test_leases_of_one_process_are_distinct(leases: Path) -> None:
    held = [lease_port(lease_dir=leases) for _ in range(200)]
    try:
        assert len({lease.port for lease in held}) == 200
    finally:
        for lease in held:
            lease.release()


def test_dropped_lease_object_keeps_the_lease(leases: Path) -> None:
    port = lease_port(lease_dir=leases).port
    import gc

    gc.collect()
    assert port_is_leased(port, lease_dir=leases)
    with pytest.raises(HarnessError, match="leased by live sessions"):
        lease_port(port_range=(port, port), lease_dir=leases)


def test_full_range_names_the_range(leases: Path) -> None:
    port = _free_port(leases)
    with (
        lease_port(port_range=(port, port), lease_dir=leases),
        pytest.raises(HarnessError) as info,
    ):
        lease_port(port_range=(port, port), lease_dir=leases)
    message = str(info.value)
    assert f"no free port in {port}-{port}" in message
    assert "port_range argument" in message
    assert "1 leased by live sessions" in message
    assert PORT_RANGE_ENV in message


def test_processes_leasing_at_once_get_distinct_ports(
    python: str, leases: Path
) -> None:
    lease_port(lease_dir=leases).release()  # create the dir before the race
    procs = _start_holders(python, count=6, each=25, directory=leases)
    ports, unbindable = _collect(procs)
    assert sum(ports.values()) == 150
    assert [port for port, n in ports.items() if n > 1] == []
    assert unbindable == []


@pytest.mark.slow
def test_32_processes_by_50_leases_are_distinct(python: str, leases: Path) -> None:
    lease_port(lease_dir=leases).release()
    procs = _start_holders(python, count=32, each=50, directory=leases)
    ports, unbindable = _collect(procs)
    assert sum(ports.values()) == 1600
    assert [port for port, n in ports.items() if n > 1] == []
    assert unbindable == []


# --- a lease ends with its owner --------------------------------------------


def _spawn_holder(python: str, leases: Path, code: str = "") -> subprocess.Popen:
    """A process that leases one port, runs *code*, prints a JSON line, sleeps."""
    script = textwrap.dedent(
        """
        import json, os, subprocess, sys, time
        from pathlib import Path
        from harness.ports import lease_port

        lease = lease_port(lease_dir=Path(sys.argv[1]))
        extra = {}
        """
    )
    script += textwrap.dedent(code)
    script += textwrap.dedent(
        """
        print(json.dumps({"port": lease.port, "pid": os.getpid(), **extra}),
              flush=True)
        time.sleep(120)
        """
    )
    return subprocess.Popen(
        [python, "-c", script, str(leases)], stdout=subprocess.PIPE, text=True
    )


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_sigkilled_holder_frees_its_port(python: str, leases: Path) -> None:
    proc = _spawn_holder(python, leases)
    try:
        info = json.loads(proc.stdout.readline())
        port = info["port"]
        assert port_is_leased(port, lease_dir=leases)
        holder = port_holder(port, lease_dir=leases)
        assert holder is not None
        assert holder.pid == proc.pid
        with pytest.raises(HarnessError, match="1 leased by live sessions"):
            lease_port(port_range=(port, port), lease_dir=leases)
    finally:
        _kill(proc)
    assert not port_is_leased(port, lease_dir=leases)
    with lease_port(port_range=(port, port), lease_dir=leases) as lease:
        assert lease.port == port


def test_exec_child_does_not_inherit_the_lease(python: str, leases: Path) -> None:
    # close_fds=False: even a child that keeps every inheritable descriptor
    # must not get the lock, which is close-on-exec.
    code = """
        child = subprocess.Popen(["sleep", "60"], close_fds=False)
        extra = {"child": child.pid}
    """
    proc = _spawn_holder(python, leases, code)
    info = json.loads(proc.stdout.readline())
    try:
        _kill(proc)
        assert not port_is_leased(info["port"], lease_dir=leases)
    finally:
        os.kill(info["child"], signal.SIGKILL)  # our own grandchild, by pid


def test_forked_child_does_not_hold_the_lease(python: str, leases: Path) -> None:
    code = """
        pid = os.fork()
        if pid == 0:
            assert not lease.held
            time.sleep(60)
            os._exit(0)
        extra = {"child": pid}
    """
    proc = _spawn_holder(python, leases, code)
    info = json.loads(proc.stdout.readline())
    try:
        assert port_is_leased(info["port"], lease_dir=leases)
        _kill(proc)
        # The forked child still runs, yet the port is free.
        os.kill(info["child"], 0)
        assert not port_is_leased(info["port"], lease_dir=leases)
    finally:
        os.kill(info["child"], signal.SIGKILL)


# --- ports in use by programs outside the harness ---------------------------


@pytest.mark.parametrize("reuse", [False, True], ids=["plain", "SO_REUSEADDR"])
@pytest.mark.parametrize("listen", [False, True], ids=["bound", "listening"])
def test_port_with_a_foreign_socket_is_skipped(
    leases: Path, reuse: bool, listen: bool
) -> None:
    port = _free_port(leases)
    sock = socket.socket()
    try:
        if reuse:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        if listen:
            sock.listen()
        with pytest.raises(HarnessError, match="1 in use by other sockets"):
            lease_port(port_range=(port, port), lease_dir=leases)
        assert not port_is_leased(port, lease_dir=leases)
    finally:
        sock.close()


@pytest.mark.skipif(sys.platform != "linux", reason="127.0.0.2 is local on Linux")
def test_port_listened_on_another_local_address_is_skipped(leases: Path) -> None:
    port = _free_port(leases)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.2", port))
        sock.listen()
        with pytest.raises(HarnessError, match="1 in use by other sockets"):
            lease_port(port_range=(port, port), lease_dir=leases)


def test_lease_skips_busy_ports_and_grants_the_next(leases: Path) -> None:
    port = _free_port(leases)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        neighbour = port + 1 if port < 65535 else port - 1
        span = (min(port, neighbour), max(port, neighbour))
        for _ in range(5):  # the random start picks either end
            with lease_port(port_range=span, lease_dir=leases) as lease:
                assert lease.port == neighbour


# --- lock files that are not ours to trust ----------------------------------


def _unusable(leases: Path, port: int) -> str:
    with pytest.raises(HarnessError) as info:
        lease_port(port_range=(port, port), lease_dir=leases)
    message = str(info.value)
    assert "1 with unusable lock files" in message
    return message


def test_symlinked_lock_file_is_skipped_and_not_followed(
    leases: Path, tmp_path: Path
) -> None:
    port = _free_port(leases)
    (leases / f"{port}.lock").unlink()
    target = tmp_path / "victim"
    target.write_text("precious\n")
    (leases / f"{port}.lock").symlink_to(target)
    message = _unusable(leases, port)
    assert "symbolic link" in message
    assert target.read_text() == "precious\n"
    assert not port_is_leased(port, lease_dir=leases)


def test_hard_linked_lock_file_is_skipped_and_not_written(
    leases: Path, tmp_path: Path
) -> None:
    port = _free_port(leases)
    (leases / f"{port}.lock").unlink()
    target = tmp_path / "victim"
    target.write_text("precious\n")
    os.link(target, leases / f"{port}.lock")
    assert "2 hard links" in _unusable(leases, port)
    assert target.read_text() == "precious\n"


def test_folder_in_place_of_a_lock_file_is_skipped(leases: Path) -> None:
    port = _free_port(leases)
    (leases / f"{port}.lock").unlink()
    (leases / f"{port}.lock").mkdir()
    _unusable(leases, port)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_lock_file_of_another_user_is_skipped(leases: Path) -> None:
    port = _free_port(leases)
    os.chown(leases / f"{port}.lock", NOBODY, NOBODY)
    assert f"owned by uid {NOBODY}" in _unusable(leases, port)


# --- the lease dir ----------------------------------------------------------


def test_lease_dir_is_created_shared_and_sticky(leases: Path) -> None:
    lease_port(lease_dir=leases).release()
    mode = leases.lstat().st_mode
    assert stat.S_ISDIR(mode)
    assert stat.S_IMODE(mode) == 0o1777


def test_default_lease_dir_is_under_the_temp_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(LEASE_DIR_ENV, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert lease_dir() == tmp_path / "harness-leases"
    assert stat.S_IMODE((tmp_path / "harness-leases").stat().st_mode) == 0o1777
    with lease_port() as lease:
        assert lease.path.parent == tmp_path / "harness-leases"
        assert port_is_leased(lease.port)


def test_lease_dir_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, leases: Path
) -> None:
    monkeypatch.setenv(LEASE_DIR_ENV, str(leases))
    assert lease_dir() == leases
    with lease_port() as lease:
        assert lease.path.parent == leases
    assert lease_dir({LEASE_DIR_ENV: str(leases / "other")}) == leases / "other"


def _bad_dir(path: Path, *fragments: str) -> None:
    for attempt in (
        lambda: lease_dir({LEASE_DIR_ENV: str(path)}),
        lambda: lease_port(lease_dir=path),
    ):
        with pytest.raises(HarnessError) as info:
            attempt()
        message = str(info.value)
        assert str(path) in message
        assert LEASE_DIR_ENV in message
        for fragment in fragments:
            assert fragment in message


def test_symlinked_lease_dir_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    _bad_dir(link, "symlink", str(real))


def test_file_as_lease_dir_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("")
    _bad_dir(path, "not a folder")


def test_lease_dir_writable_by_others_without_sticky_bit_is_refused(
    tmp_path: Path,
) -> None:
    path = tmp_path / "open"
    path.mkdir()
    path.chmod(0o777)
    _bad_dir(path, "sticky", "0777", "chmod +t")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_lease_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "theirs"
    path.mkdir(mode=0o1777)
    os.chown(path, NOBODY, NOBODY)
    _bad_dir(path, f"uid {NOBODY}", "install -d -m 1777")


def test_relative_lease_dir_is_refused() -> None:
    _bad_dir(Path("relative/leases"), "not an absolute path")


def test_private_lease_dir_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "private"
    path.mkdir(mode=0o700)
    with lease_port(lease_dir=path) as lease:
        assert lease.path.parent == path


# --- the port range ---------------------------------------------------------


def _proc_range(name: str) -> str:
    return Path(f"/proc/sys/net/ipv4/{name}").read_text().strip()


@pytest.mark.skipif(sys.platform != "linux", reason="reads Linux's /proc")
def test_default_range_stays_below_the_ephemeral_range() -> None:
    low, high = default_port_range()
    ephemeral_low = int(_proc_range("ip_local_port_range").split()[0])
    if ephemeral_low > 21000:
        assert (low, high) == (20000, ephemeral_low - 1)
    assert 1024 <= low <= high <= 65535
    assert high - low + 1 >= 1000


def test_range_from_the_environment_is_used(
    monkeypatch: pytest.MonkeyPatch, leases: Path
) -> None:
    port = _free_port(leases)
    monkeypatch.setenv(PORT_RANGE_ENV, f"{port}-{port}")
    assert configured_port_range() == (port, port)
    with lease_port(lease_dir=leases) as lease:
        assert lease.port == port
        with pytest.raises(HarnessError, match=f"from \\${PORT_RANGE_ENV}"):
            lease_port(lease_dir=leases)


@pytest.mark.parametrize(
    "value", ["abc", "30000", "30000:31000", "31000-30000", "80-90", "60000-70000"]
)
def test_bad_range_in_the_environment_is_refused(value: str) -> None:
    with pytest.raises(HarnessError) as info:
        configured_port_range({PORT_RANGE_ENV: value})
    message = str(info.value)
    assert PORT_RANGE_ENV in message
    assert "20000-32767" in message


@pytest.mark.parametrize(
    "span", [(30000,), (31000, 30000), (80, 90), ("1", "2"), (True, 30000), [1, 2]]
)
def test_bad_range_argument_is_refused(span: object, leases: Path) -> None:
    with pytest.raises(HarnessError, match="port_range argument"):
        lease_port(port_range=span, lease_dir=leases)  # type: ignore[arg-type]


def test_host_must_be_an_ip_address(leases: Path) -> None:
    with pytest.raises(HarnessError, match="'localhost' is not an IP address"):
        lease_port(lease_dir=leases, host="localhost")


def test_host_must_be_an_address_of_this_machine(leases: Path) -> None:
    # 192.0.2.0/24 is reserved for documentation: no host has it.
    with pytest.raises(HarnessError, match=r"cannot bind to host '192\.0\.2\.1'"):
        lease_port(lease_dir=leases, host="192.0.2.1")


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
def test_ipv6_loopback_lease(leases: Path) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("::1 is not configured")
    with (
        lease_port(lease_dir=leases, host="::1") as lease,
        socket.socket(socket.AF_INET6) as sock,
    ):
        sock.bind(lease.address)


def test_port_is_leased_does_not_create_lock_files(leases: Path) -> None:
    lease_port(lease_dir=leases).release()
    before = set(leases.iterdir())
    assert not port_is_leased(12345, lease_dir=leases)
    assert port_holder(12345, lease_dir=leases) is None
    assert set(leases.iterdir()) == before


# --- several users of one host ----------------------------------------------


@pytest.fixture
def shared_leases() -> Iterator[Path]:
    """A lease dir another user can reach (tmp_path's parents are 0700)."""
    base = Path(tempfile.mkdtemp(prefix="hlt-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base / "leases"
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)


def _as_nobody(code: str, **values: object) -> dict:
    """Run *code* in a forked child that has become user nobody; its result."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        status = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            scope: dict = {"lease_port": lease_port, "Path": Path, **values}
            scope["port_is_leased"] = port_is_leased
            scope["HarnessError"] = HarnessError
            exec(textwrap.dedent(code), scope)
            os.write(write, json.dumps(scope["result"]).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read) as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child as nobody failed"
    return json.loads(data)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_another_user_cannot_lease_a_held_port(shared_leases: Path) -> None:
    first = _free_port(shared_leases)
    # Root created the lock file, root owns the dir: nobody may use it...
    result = _as_nobody(
        """
        with lease_port(port_range=(port, port), lease_dir=d) as lease:
            result = {"port": lease.port, "uid": lease.path.stat().st_uid}
        """,
        port=first,
        d=shared_leases,
    )
    assert result == {"port": first, "uid": 0}
    # ...but not while root holds the lease.
    with lease_port(port_range=(first, first), lease_dir=shared_leases):
        result = _as_nobody(
            """
            try:
                lease_port(port_range=(port, port), lease_dir=d)
                result = "granted"
            except HarnessError as exc:
                result = str(exc)
            result = [result, port_is_leased(port, lease_dir=d)]
            """,
            port=first,
            d=shared_leases,
        )
    assert "1 leased by live sessions" in result[0]
    assert result[1] is True


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_lock_file_created_by_another_user_is_not_trusted(
    shared_leases: Path,
) -> None:
    port = _free_port(shared_leases)
    (shared_leases / f"{port}.lock").unlink()
    result = _as_nobody(
        """
        with lease_port(port_range=(port, port), lease_dir=d) as lease:
            result = lease.path.stat().st_uid
        """,
        port=port,
        d=shared_leases,
    )
    assert result == NOBODY
    # nobody could swap that file under a lease of ours: skip it.
    assert f"owned by uid {NOBODY}" in _unusable(shared_leases, port)
