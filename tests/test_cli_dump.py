"""``harness dump`` against a real session started with ``harness exec``."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from harness import exit_codes
from harness.records import SessionStore
from harness.stacks import find_py_spy

SCRIPT = textwrap.dedent(
    """
    import multiprocessing, os, sys, time
    from pathlib import Path
    from harness.faulthandler_hook import enable

    def block_here_dump_child_xyz():
        enable()
        Path(sys.argv[1], "child").write_text(str(os.getpid()))
        time.sleep(600)

    def block_here_dump_main_xyz():
        Path(sys.argv[1], "main").write_text(str(os.getpid()))
        time.sleep(600)

    if __name__ == "__main__":
        enable()
        multiprocessing.get_context("spawn").Process(
            target=block_here_dump_child_xyz
        ).start()
        block_here_dump_main_xyz()
    """
)


@dataclass
class Live:
    session_id: str
    owner: subprocess.Popen[bytes]
    pids: dict[str, int]
    procs: list[psutil.Process]


def _harness(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def live(tmp_path: Path, runtime_dir: Path) -> Iterator[Live]:
    script = tmp_path / "blocker.py"
    script.write_text(SCRIPT)
    ready = tmp_path / "ready"
    ready.mkdir()
    owner = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "harness",
            "exec",
            "--name",
            "dumptest",
            "--",
            sys.executable,
            str(script),
            str(ready),
        ],
        stdout=subprocess.DEVNULL,
    )
    procs: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while not ((ready / "main").exists() and (ready / "child").exists()):
            if owner.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the session did not start")
            time.sleep(0.05)
        pids = {name: int((ready / name).read_text()) for name in ("main", "child")}
        procs = [psutil.Process(owner.pid), *psutil.Process(owner.pid).children(True)]
        (record,) = SessionStore(runtime_dir).list()
        yield Live(record.id, owner, pids, procs)
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs += psutil.Process(owner.pid).children(True)
        for proc in reversed(procs):
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(procs, timeout=10)
        owner.wait(timeout=10)


@pytest.mark.skipif(find_py_spy() is None, reason="py-spy is not installed here")
def test_dump_writes_every_process_stack_and_kills_nothing(
    live: Live, tmp_path: Path
) -> None:
    out = tmp_path / "stacks.txt"
    done = _harness("dump", live.session_id[:10], "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    text = out.read_text()
    assert f"session {live.session_id}" in text
    assert "block_here_dump_main_xyz" in text
    assert "block_here_dump_child_xyz" in text
    assert str(out) in done.stdout
    for pid in (*live.pids.values(), live.owner.pid):
        assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


def test_dump_without_py_spy_uses_the_signal_and_marks_stuck_frames(
    live: Live,
) -> None:
    done = _harness("dump", live.session_id, "--no-py-spy", "--delay", "0.3")
    text = done.stdout
    assert "block_here_dump_main_xyz" in text, text + done.stderr
    assert "block_here_dump_child_xyz" in text
    for line in text.splitlines():
        if "block_here_dump_" in line:
            assert line.lstrip().startswith("="), line
    # The owner (harness exec itself) and multiprocessing's resource tracker
    # never called enable(): listed, with the reason, and the status says so.
    assert "no handler registered for SIGUSR2" in text
    assert done.returncode == 1
    assert live.owner.poll() is None


def test_dump_names_the_missing_session() -> None:
    done = _harness("dump", "no-such-session")
    assert done.returncode == exit_codes.HARNESS_ERROR
    assert "no session matches 'no-such-session'" in done.stderr


def test_dump_without_sessions_says_how_to_start_one() -> None:
    done = _harness("dump")
    assert done.returncode == exit_codes.HARNESS_ERROR
    assert "harness exec -- CMD" in done.stderr
