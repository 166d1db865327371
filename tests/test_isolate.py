"""Enforced isolation: real namespaces, real processes, real sockets.

The collision tests start several copies of a target that hard-codes its
addresses (tests/targets/hardcoded_target.py) and release them together, so
that they overlap for certain. Runs without isolation use the host's network
with a port that was free a moment before, never 1616 itself, so that no other
program on this host (a tractor suite, say) sees our listeners; isolated runs
use 1616, which each namespace has to itself.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from harness import isolate, nsinit
from harness.errors import HarnessError
from harness.isolate import Capabilities, IsolationPlan

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="kernel namespaces are Linux-only"
)

TARGET = Path(__file__).parent / "targets" / "hardcoded_target.py"
REPO = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
PYTHON313 = Path.home() / ".pyenv/versions/3.13.0/bin/python"


@pytest.fixture(scope="module")
def caps() -> Capabilities:
    """This host's capabilities; skips the module's namespace tests without them."""
    found = isolate.detect()
    if "pid" not in found.levels:
        pytest.skip(f"namespaces are not permitted here: {found.why_not('pid')}")
    return found


class Started:
    """Processes and plans a test started, ended at exit whatever happens."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.plans: list[IsolationPlan] = []

    def run(
        self,
        argv: Sequence[str],
        *,
        plan: IsolationPlan | None = None,
        env: dict[str, str] | None = None,
        **popen: object,
    ) -> subprocess.Popen[str]:
        wrapped = plan.wrap(argv) if plan else list(argv)
        proc: subprocess.Popen[str] = subprocess.Popen(
            wrapped,
            env=env,
            text=True,
            **popen,  # type: ignore[call-overload]
        )
        self.procs.append(proc)
        if plan is not None:
            self.plans.append(plan)
            plan.started(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream:
                    stream.close()
        for plan in self.plans:
            plan.teardown()


@pytest.fixture
def started() -> Iterator[Started]:
    tracker = Started()
    try:
        yield tracker
    finally:
        tracker.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_targets(
    started: Started,
    n: int,
    *,
    port: int,
    isolated_net: bool,
    private_xdg: bool,
    root: Path,
    caps: Capabilities,
) -> list[dict[str, object]]:
    """Start *n* targets, let them all bind, release them, return their verdicts."""
    shared = root / "shared-xdg"
    shared.mkdir(mode=0o700, exist_ok=True)
    procs = []
    for i in range(n):
        xdg = root / f"xdg-{i}" if private_xdg else shared
        xdg.mkdir(mode=0o700, exist_ok=True)
        env = isolate.private_env(xdg, os.environ)
        plan = isolate.plan("net", capabilities=caps) if isolated_net else None
        procs.append(
            started.run(
                [sys.executable, str(TARGET), str(port)],
                plan=plan,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
        )
    # Every instance holds its listeners (or has failed to) before any is let go.
    bound = [json.loads(proc.stdout.readline()) for proc in procs]  # type: ignore[union-attr]
    assert all(b["phase"] == "bound" for b in bound), bound
    for proc in procs:
        proc.stdin.close()  # type: ignore[union-attr]
    verdicts = []
    for proc in procs:
        verdict = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
        verdict["status"] = proc.wait(timeout=60)
        verdicts.append(verdict)
    return verdicts


# ------------------------------------------------------------- collisions


@pytest.mark.parametrize("n", [2, 8])
def test_isolated_targets_on_1616_do_not_collide(
    n: int, started: Started, runtime_dir: Path, caps: Capabilities
) -> None:
    verdicts = run_targets(
        started,
        n,
        port=1616,
        isolated_net=True,
        private_xdg=True,
        root=runtime_dir,
        caps=caps,
    )
    assert [v["status"] for v in verdicts] == [0] * n, verdicts
    assert all(v["tcp"] == "ok" and v["uds"] == "ok" for v in verdicts)
    assert all(v["foreign_connections"] == 0 for v in verdicts)
    netns = {v["netns"] for v in verdicts}
    assert len(netns) == n
    assert nsinit.namespace_id("self", "net") not in netns


def test_without_isolation_the_same_targets_collide(
    started: Started, runtime_dir: Path, caps: Capabilities
) -> None:
    verdicts = run_targets(
        started,
        2,
        port=free_port(),
        isolated_net=False,
        private_xdg=False,
        root=runtime_dir,
        caps=caps,
    )
    # The TCP bind is atomic: exactly one instance gets the port. The socket
    # file is not: the loser either sees it served, or replaces it before the
    # winner listens and the winner's name then leads elsewhere.
    assert [v["status"] for v in verdicts].count(3) >= 1, verdicts
    assert sum(str(v["tcp"]).startswith("collision") for v in verdicts) >= 1
    assert sum(v["uds"] != "ok" for v in verdicts) >= 1


def test_a_private_network_alone_leaves_the_socket_name_shared(
    started: Started, runtime_dir: Path, caps: Capabilities
) -> None:
    verdicts = run_targets(
        started,
        2,
        port=1616,
        isolated_net=True,
        private_xdg=False,
        root=runtime_dir,
        caps=caps,
    )
    assert all(v["tcp"] == "ok" for v in verdicts), verdicts
    assert sum(v["uds"] != "ok" for v in verdicts) == 1


def test_a_private_xdg_dir_alone_leaves_the_port_shared(
    started: Started, runtime_dir: Path, caps: Capabilities
) -> None:
    verdicts = run_targets(
        started,
        2,
        port=free_port(),
        isolated_net=False,
        private_xdg=True,
        root=runtime_dir,
        caps=caps,
    )
    assert all(v["uds"] == "ok" for v in verdicts), verdicts
    assert sum(str(v["tcp"]).startswith("collision") for v in verdicts) >= 1


def test_listeners_inside_are_read_from_the_namespace(
    started: Started, runtime_dir: Path, caps: Capabilities
) -> None:
    plan = isolate.plan("net", capabilities=caps)
    script = """
        import socket, sys
        a = socket.socket(); a.bind(("127.0.0.1", 1616)); a.listen()
        print("up", flush=True); sys.stdin.read()
    """
    proc = started.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        plan=plan,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout.readline() == "up\n"  # type: ignore[union-attr]

    assert plan.processes() == [proc.pid]
    inside = plan.listeners()
    assert [(lst.addr, lst.port) for lst in inside] == [("127.0.0.1", 1616)]
    host_inodes = {lst.inode for lst in isolate.tcp_listeners_in(os.getpid())}
    assert inside[0].inode not in host_inodes
    assert plan.record_fields()["netns"] == nsinit.namespace_id(proc.pid, "net")


def test_ipv6_listeners_are_decoded(
    started: Started, runtime_dir: Path, caps: Capabilities
) -> None:
    if not socket.has_ipv6 or not Path("/proc/net/if_inet6").exists():
        pytest.skip("IPv6 is disabled in this kernel")
    plan = isolate.plan("net", capabilities=caps)
    script = """
        import socket, sys
        a = socket.socket(socket.AF_INET6); a.bind(("::1", 1616)); a.listen()
        print("up", flush=True); sys.stdin.read()
    """
    proc = started.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        plan=plan,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout.readline() == "up\n"  # type: ignore[union-attr]
    assert [(lst.addr, lst.port) for lst in plan.listeners()] == [("::1", 1616)]


# ------------------------------------------------------------ pid namespace

# Starts a double-forked daemon, waits until it has become `sleep 600` (its
# end of a close-on-exec pipe closes at exec), prints its own pid inside the
# namespace and the name of pid 1 there, and exits.
DAEMON = """
    import os, sys
    execd, daemon_end = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.execvp("sleep", ["sleep", "600"])
        os._exit(0)
    os.close(daemon_end)
    os.read(execd, 1)
    os.wait()
    print(os.getpid(), open("/proc/1/comm").read().strip(), flush=True)
"""


def pythons() -> list[str]:
    found = [sys.executable]
    if PYTHON313.exists():
        found.append(str(PYTHON313))  # os.unshare instead of ctypes
    return found


@pytest.mark.parametrize("python", pythons())
def test_pid_teardown_ends_a_double_forked_daemon(
    python: str, started: Started, caps: Capabilities
) -> None:
    plan = isolate.plan("pid", capabilities=caps, python=python)
    proc = started.run(
        [sys.executable, "-c", textwrap.dedent(DAEMON)],
        plan=plan,
        stdout=subprocess.PIPE,
    )
    # The command ends and its status arrives while the daemon still runs:
    # the namespace is held for the leak check.
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert out.split() == ["2", "harness-nsinit"]
    leftovers = plan.processes()
    assert len(leftovers) == 1
    daemon = leftovers[0]
    assert Path(f"/proc/{daemon}/cmdline").read_bytes() == b"sleep\x00600\x00"
    assert plan.helper_pids() == {plan.namespaces.init_pid}  # type: ignore[union-attr]

    ended = plan.teardown()
    assert [(p.pid, p.cmdline) for p in ended] == [(daemon, ("sleep", "600"))]
    assert "sleep 600" in str(ended[0])
    assert not Path(f"/proc/{daemon}").exists()
    assert isolate.processes_in_namespace(plan.namespaces.pidns) == []  # type: ignore[union-attr, arg-type]
    assert plan.teardown() == []


def test_pid_namespace_mounts_no_proc_on_the_host(
    started: Started, caps: Capabilities
) -> None:
    before = Path("/proc/self/mountinfo").read_text()
    plan = isolate.plan("pid", capabilities=caps)
    proc = started.run(["sh", "-c", "exit 0"], plan=plan)
    assert proc.wait(timeout=60) == 0
    assert Path("/proc/self/mountinfo").read_text() == before
    assert plan.teardown() == []


@pytest.mark.parametrize(
    ("command", "status"),
    [("exit 7", 7), ("kill -TERM $$", -signal.SIGTERM)],
)
def test_pid_wrapper_ends_the_way_the_command_did(
    command: str, status: int, started: Started, caps: Capabilities
) -> None:
    plan = isolate.plan("pid", capabilities=caps)
    proc = started.run(["sh", "-c", command], plan=plan)
    assert proc.wait(timeout=60) == status


def test_pid_wrapper_forwards_sigterm_to_the_command(
    started: Started, caps: Capabilities
) -> None:
    plan = isolate.plan("pid", capabilities=caps)
    script = "import sys, time; print('up', flush=True); time.sleep(600)"
    proc = started.run(
        [sys.executable, "-c", script], plan=plan, stdout=subprocess.PIPE
    )
    assert proc.stdout.readline() == "up\n"  # type: ignore[union-attr]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM


def test_missing_command_is_status_127(started: Started, caps: Capabilities) -> None:
    for level in ("net", "pid"):
        plan = isolate.plan(level, capabilities=caps)
        proc = started.run(
            ["no-such-program-d41d8cd9"], plan=plan, stderr=subprocess.PIPE
        )
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 127
        assert "cannot run 'no-such-program-d41d8cd9'" in err


def test_pid_namespace_ends_when_its_starter_dies(
    started: Started, runtime_dir: Path, caps: Capabilities
) -> None:
    # A stand-in for a harness that crashes between the command and teardown.
    starter = f"""
        import subprocess, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from harness import isolate
        plan = isolate.plan("pid")
        argv = plan.wrap([sys.executable, "-c", {textwrap.dedent(DAEMON)!r}])
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        ns = plan.started(proc)
        proc.wait()
        print(ns.pidns, flush=True)
        time.sleep(600)
    """
    proc = started.run(
        [sys.executable, "-c", textwrap.dedent(starter)], stdout=subprocess.PIPE
    )
    pidns = proc.stdout.readline().strip()  # type: ignore[union-attr]
    assert pidns.startswith("pid:[")
    assert len(isolate.processes_in_namespace(pidns)) == 2  # init and the daemon

    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    while isolate.processes_in_namespace(pidns) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert isolate.processes_in_namespace(pidns) == []


# ------------------------------------------------------- as an ordinary user


def as_nobody_env(home: Path) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO),
        "HARNESS_RUNTIME_DIR": str(home),
        "HOME": str(home),
    }


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A folder the user ``nobody`` owns (the per-test runtime dir is root's)."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run a child as nobody")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"needs {SYSTEM_PYTHON}, which nobody may run")
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="hno-", dir="/tmp"))
    os.chown(path, 65534, 65534)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_an_ordinary_user_gets_isolation_through_a_user_namespace(
    nobody_dir: Path,
) -> None:
    driver = f"""
        import json, os, subprocess, sys
        from harness import isolate
        caps = isolate.detect()
        if "pid" not in caps.levels:
            print(json.dumps({{"skip": caps.why_not("pid")}})); sys.exit()
        result = {{"mechanism": caps.mechanism}}
        xdg = os.path.join(os.environ["HOME"], "xdg")
        os.mkdir(xdg, 0o700)
        plan = isolate.plan("pid")
        result["userns"] = plan.userns
        argv = plan.wrap([sys.executable, {str(TARGET)!r}, "1616"])
        proc = subprocess.Popen(argv, env=isolate.private_env(xdg), text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        plan.started(proc)
        out, _ = proc.communicate("")
        result["target"] = json.loads(out.splitlines()[-1])
        result["status"] = proc.returncode
        plan2 = isolate.plan("pid")
        argv = plan2.wrap([sys.executable, "-c", {textwrap.dedent(DAEMON)!r}])
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        plan2.started(proc)
        proc.wait()
        result["ended"] = [p.cmdline for p in plan2.teardown()]
        result["uid_inside"] = subprocess.run(
            isolate.plan("net").wrap(["id", "-u"]), capture_output=True, text=True
        ).stdout.strip()
        print(json.dumps(result))
    """
    done = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            SYSTEM_PYTHON,
            "-c",
            textwrap.dedent(driver),
        ],
        env=as_nobody_env(nobody_dir),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    if "skip" in result:
        pytest.skip(result["skip"])
    assert result["mechanism"] == "user namespace"
    assert result["userns"] is True
    assert result["status"] == 0, result
    assert result["target"]["tcp"] == "ok"
    assert result["target"]["uds"] == "ok"
    assert result["ended"] == [["sleep", "600"]]
    assert result["uid_inside"] == "65534"  # mapped to itself, not to root


def test_refusal_when_user_namespaces_are_forbidden(nobody_dir: Path) -> None:
    # A real refusal from the kernel, without touching this host's settings:
    # the user-namespace limit is per user namespace, so the child sets it to
    # 0 inside a namespace of its own, then drops to an ordinary user there.
    driver = """
        import json, logging, os, subprocess, sys
        from harness import isolate, nsinit
        from harness.errors import HarnessError
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        child = os.fork()
        if child:
            os.read(ready_r, 1)
            for name in ("uid_map", "gid_map"):
                with open(f"/proc/{child}/{name}", "w") as f:
                    f.write("0 0 65536\\n")
            os.write(go_w, b"x")
            _, status = os.waitpid(child, 0)
            sys.exit(os.waitstatus_to_exitcode(status))
        nsinit.unshare(nsinit.CLONE_NEWUSER)
        os.write(ready_w, b"x")
        os.read(go_r, 1)
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0")
        os.setgroups([])
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)

        result = {}
        caps = isolate.detect()
        result["levels"] = list(caps.levels)
        try:
            isolate.plan("net", capabilities=caps)
        except HarnessError as exc:
            result["plan_error"] = str(exc)
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("harness").addHandler(handler)
        logging.getLogger("harness").setLevel(logging.INFO)
        result["auto"] = isolate.plan("auto", capabilities=caps).level
        result["auto_log"] = [r.getMessage() for r in records]
        # Forcing a plan past detection: the wrapper's own report.
        forced = isolate.IsolationPlan("net", userns=True)
        proc = subprocess.Popen(forced.wrap(["true"]), stderr=subprocess.PIPE)
        try:
            forced.started(proc)
        except HarnessError as exc:
            result["started_error"] = str(exc)
        result["status"] = proc.wait()
        forced.teardown()
        print(json.dumps(result), flush=True)
        os._exit(0)
    """
    done = subprocess.run(
        [SYSTEM_PYTHON, "-c", textwrap.dedent(driver)],
        env=as_nobody_env(nobody_dir),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["levels"] == []
    error = result["plan_error"]
    assert "cannot run the session in a private network namespace" in error
    assert "uid 65534" in error
    assert "user.max_user_namespaces is 0" in error
    assert "sudo sysctl -w user.max_user_namespaces=15000" in error
    assert "--isolate auto" in error
    assert result["auto"] == "none"
    assert len(result["auto_log"]) == 1
    assert "chose none" in result["auto_log"][0]
    started_error = result["started_error"]
    assert "No space left on device (ENOSPC)" in started_error
    assert "sudo sysctl -w user.max_user_namespaces=15000" in started_error
    assert result["status"] == nsinit.EXIT_SETUP_FAILED


# ----------------------------------------------- detection from a fake /proc


def fake_proc(
    root: Path,
    *,
    uid: int = 1000,
    cap_eff: str = "0000000000000000",
    sysctls: dict[str, str] | None = None,
) -> Path:
    (root / "self").mkdir(parents=True)
    (root / "self/status").write_text(
        f"Name:\tpython\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nCapEff:\t{cap_eff}\n"
    )
    for name, value in (sysctls or {}).items():
        path = root / "sys" / name.replace(".", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{value}\n")
    return root


@pytest.mark.parametrize(
    ("sysctls", "expected"),
    [
        (
            {"kernel.unprivileged_userns_clone": "0"},
            "sudo sysctl -w kernel.unprivileged_userns_clone=1",
        ),
        (
            {"user.max_user_namespaces": "0"},
            "sudo sysctl -w user.max_user_namespaces=15000",
        ),
        (
            {"kernel.apparmor_restrict_unprivileged_userns": "1"},
            "sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0",
        ),
    ],
)
def test_each_sysctl_that_forbids_user_namespaces_is_named(
    tmp_path: Path, sysctls: dict[str, str], expected: str
) -> None:
    root = fake_proc(tmp_path / "proc", sysctls=sysctls)
    caps = isolate.detect(proc_root=root)
    assert caps.levels == ()
    assert caps.mechanism == "none"
    assert not caps.probed
    with pytest.raises(HarnessError) as info:
        isolate.plan("pid", capabilities=caps)
    message = str(info.value)
    ((name, value),) = sysctls.items()
    assert f"{name} is {value}" in message
    assert expected in message
    assert "uid 1000" in message
    assert "or run the session as root" in message
    assert re.search(rf"^{re.escape(name)} +{value} ", caps.render(), re.MULTILINE)


def test_an_ordinary_user_with_user_namespaces_allowed(tmp_path: Path) -> None:
    root = fake_proc(
        tmp_path / "proc",
        sysctls={
            "user.max_user_namespaces": "15000",
            "kernel.unprivileged_userns_clone": "1",
            "kernel.apparmor_restrict_unprivileged_userns": "0",
        },
    )
    caps = isolate.detect(proc_root=root)
    assert caps.levels == ("net", "pid")
    assert caps.mechanism == "user namespace"
    chosen = isolate.plan("auto", capabilities=caps)
    assert (chosen.level, chosen.userns) == ("pid", True)


def test_root_is_privileged(tmp_path: Path) -> None:
    root = fake_proc(
        tmp_path / "proc",
        uid=0,
        cap_eff="000001ffffffffff",
        sysctls={"kernel.unprivileged_userns_clone": "0"},
    )
    caps = isolate.detect(proc_root=root)
    assert caps.privileged
    assert caps.levels == ("net", "pid")
    assert isolate.plan("net", capabilities=caps).userns is False


def test_macos_gets_cooperative_isolation_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caps = isolate.detect(platform="darwin")
    assert caps.levels == ()
    with pytest.raises(HarnessError, match="only cooperative isolation"):
        isolate.plan("net", capabilities=caps)
    with caplog.at_level(logging.INFO, logger="harness.isolate"):
        assert isolate.plan("auto", capabilities=caps).level == "none"
    assert "chose none (cooperative isolation only)" in caplog.text


def test_auto_says_what_it_chose(
    caps: Capabilities, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="harness.isolate"):
        chosen = isolate.plan("auto", capabilities=caps)
    assert chosen.level == "pid"
    assert chosen.requested == "auto"
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1
    assert "Isolation 'auto' chose pid" in infos[0].getMessage()


# -------------------------------------------------------------- the plan API


@pytest.mark.parametrize(
    ("requested", "level"),
    [
        ("none", "none"),
        ([], "none"),
        ("net", "net"),
        (["net", "pid"], "pid"),
        ("net,pid", "pid"),
        ("pid", "pid"),
    ],
)
def test_requested_levels_are_normalised(
    requested: str | list[str], level: str, caps: Capabilities
) -> None:
    assert isolate.plan(requested, capabilities=caps).level == level


@pytest.mark.parametrize(
    ("requested", "match"),
    [
        ("bogus", "unknown isolation level 'bogus': choose from none, net, pid, auto"),
        (["none", "net"], "'none' cannot be combined"),
        ("auto,pid", "'auto' cannot be combined"),
    ],
)
def test_bad_requests_are_refused(requested: str | list[str], match: str) -> None:
    with pytest.raises(HarnessError, match=match):
        isolate.plan(requested)


def test_level_none_changes_nothing() -> None:
    plan = isolate.plan("none")
    assert plan.wrap(["pytest", "-x"]) == ["pytest", "-x"]
    assert plan.started(os.getpid()) is None
    assert plan.processes() == []
    assert plan.teardown() == []
    assert plan.record_fields() == {"isolate": [], "netns": None, "pidns": None}
    assert "cooperative" in plan.describe()


def test_a_plan_wraps_one_command(caps: Capabilities) -> None:
    plan = isolate.plan("net", capabilities=caps)
    with pytest.raises(HarnessError, match="empty command"):
        plan.wrap([])
    argv = plan.wrap(["true"])
    assert argv[-2:] == ["--", "true"]
    assert str(isolate.NSINIT_SCRIPT) in argv
    with pytest.raises(HarnessError, match="new plan per session"):
        plan.wrap(["true"])
    plan.teardown()


def test_private_env_points_xdg_dirs_into_the_bindspace(runtime_dir: Path) -> None:
    bindspace = runtime_dir / "tractor" / "s-1"
    bindspace.mkdir(parents=True, mode=0o700)
    original = {"PATH": "/usr/bin", "XDG_RUNTIME_DIR": "/run/user/0"}
    env = isolate.private_env(bindspace, original)
    assert env["XDG_RUNTIME_DIR"] == str(bindspace)
    assert env["XDG_CACHE_HOME"] == str(bindspace / "cache")
    assert (bindspace / "cache").stat().st_mode & 0o777 == 0o700
    assert env["PATH"] == "/usr/bin"
    assert original["XDG_RUNTIME_DIR"] == "/run/user/0"
    with pytest.raises(HarnessError, match="absolute path"):
        isolate.private_env("relative/dir", original)


def test_processes_in_namespace_refuses_a_non_id() -> None:
    with pytest.raises(HarnessError, match="not a namespace id: 'bogus'"):
        isolate.processes_in_namespace("bogus")
    own = nsinit.namespace_id("self", "net")
    assert own is not None
    assert os.getpid() in isolate.processes_in_namespace(own)


def test_teardown_never_signals_a_reused_pid(caps: Capabilities) -> None:
    # A plan whose recorded init is this very process, in another pid
    # namespace than ours: teardown must see the mismatch and leave it alone.
    plan = isolate.IsolationPlan("pid")
    plan._namespaces = isolate.Namespaces(
        wrapper_pid=os.getpid(),
        netns=nsinit.namespace_id("self", "net") or "",
        pidns="pid:[1]",
        init_pid=os.getpid(),
        init_start_time=nsinit.start_time(),
    )
    assert plan.teardown() == []
    assert Path(f"/proc/{os.getpid()}").exists()


# -------------------------------------------------------- signals, sessions


def test_pid_wrapper_forwards_a_sigint_sent_to_it(
    started: Started, caps: Capabilities
) -> None:
    plan = isolate.plan("pid", capabilities=caps)
    proc = started.run(
        ["sh", "-c", "echo up; exec sleep 600"], plan=plan, stdout=subprocess.PIPE
    )
    assert proc.stdout.readline() == "up\n"  # type: ignore[union-attr]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == -signal.SIGINT


# Counts the SIGINTs it gets; on SIGUSR1 prints the count and exits. The
# wrapper handles pending signals lowest number first, so a SIGINT it were to
# forward would reach this command before the SIGUSR1 sent after it.
COUNT_SIGINTS = """
    import signal, sys, time
    count = 0
    def on_int(*_):
        global count
        count += 1
        print("sigint", count, flush=True)
    def on_usr1(*_):
        print("total", count, flush=True)
        sys.exit(0)
    signal.signal(signal.SIGINT, on_int)
    signal.signal(signal.SIGUSR1, on_usr1)
    print("up", flush=True)
    while True:
        time.sleep(1)
"""


def test_a_terminal_ctrl_c_reaches_the_command_once(
    started: Started, caps: Capabilities
) -> None:
    import termios

    plan = isolate.plan("pid", capabilities=caps)
    master, slave = os.openpty()

    def controlling_terminal() -> None:
        fcntl_ioctl(0, termios.TIOCSCTTY, 0)

    from fcntl import ioctl as fcntl_ioctl

    try:
        proc = started.run(
            [sys.executable, "-c", textwrap.dedent(COUNT_SIGINTS)],
            plan=plan,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=controlling_terminal,
        )
        os.close(slave)
        slave = -1
        output = TerminalOutput(master)
        output.wait_for("up")
        # Two SIGINTs at once would merge into one pending signal and hide a
        # duplicate, so the wrapper is stopped while the command takes the
        # terminal's copy, and only then looks at its own.
        proc.send_signal(signal.SIGSTOP)
        wait_until_stopped(proc.pid)
        os.write(master, b"\x03")  # Ctrl-C: the kernel signals the whole group
        output.wait_for("sigint 1")
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=60) == 0
        assert "total 1" in output.wait_for("total")
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


def wait_until_stopped(pid: int) -> None:
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline, f"process {pid} did not stop"
        time.sleep(0.001)


class TerminalOutput:
    """Reads what a command writes to a pseudo-terminal, line by line."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.text = ""

    def wait_for(self, word: str) -> str:
        import select

        deadline = time.monotonic() + 60
        while word not in self.text:
            left = deadline - time.monotonic()
            assert left > 0, f"no {word!r} in {self.text!r}"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    self.text += os.read(self.fd, 4096).decode(errors="replace")
                except OSError:  # EIO: every writer has closed the terminal
                    break
        return self.text


def test_a_session_gets_its_record_and_private_xdg_dirs(
    started: Started, caps: Capabilities
) -> None:
    from harness.session import Session

    plan = isolate.plan("pid", capabilities=caps)
    with Session("iso-test") as session:
        script = (
            "import os; print(os.environ['XDG_RUNTIME_DIR']); "
            "print(os.environ['XDG_CACHE_HOME'])"
        )
        argv = plan.wrap([sys.executable, "-c", script], session)
        proc = subprocess.Popen(
            argv, env=session.env(), stdout=subprocess.PIPE, text=True
        )
        started.procs.append(proc)
        started.plans.append(plan)
        namespaces = plan.started(proc, session)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        assert out.split() == [str(session.bindspace), str(session.bindspace / "cache")]
        assert namespaces is not None
        assert session.record.netns == namespaces.netns
        assert session.record.pidns == namespaces.pidns
        assert session.record.isolate == ["net", "pid"]
        assert plan.teardown(session) == []
