"""A hung session, end to end: ``harness exec --silence`` catches it, writes
one hang report naming every process's blocking function, reaps the whole
tree (orphan included) and exits 87."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from harness import exit_codes
from harness.stacks import find_py_spy

TREE = textwrap.dedent(
    """
    import multiprocessing, os, sys, threading, time
    from pathlib import Path

    READY = Path(sys.argv[1])

    def ready(role):
        (READY / role).write_text(str(os.getpid()))

    def stuck_in_spawn_child_qq():
        ready("spawn"); time.sleep(600)

    def stuck_in_forkserver_child_qq():
        ready("forkserver"); time.sleep(600)

    def stuck_in_trio_child_qq():
        ready("trio"); time.sleep(600)

    def stuck_in_orphan_qq():
        ready("orphan"); time.sleep(600)

    def stuck_in_parent_qq():
        threading.Event().wait()

    def trio_child():
        import trio
        async def main():
            await trio.run_process([sys.executable, __file__, str(READY), "trio"])
        trio.run(main)

    if __name__ == "__main__":
        if sys.argv[2:] == ["trio"]:
            stuck_in_trio_child_qq()
        for method, target in (("spawn", stuck_in_spawn_child_qq),
                               ("forkserver", stuck_in_forkserver_child_qq)):
            multiprocessing.get_context(method).Process(target=target).start()
        threading.Thread(target=trio_child, daemon=True).start()
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                stuck_in_orphan_qq()
            os._exit(0)
        # Chatter until every child is up, then fall silent for good: the
        # silence limit counts from the last line, whatever start-up took.
        roles = {"spawn", "forkserver", "trio", "orphan"}
        while not all((READY / r).exists() for r in roles):
            print("waiting for", sorted(r for r in roles if not (READY / r).exists()),
                  flush=True)
            time.sleep(0.2)
        print("all blocked", flush=True)
        stuck_in_parent_qq()
    """
)

FUNCTIONS = (
    "stuck_in_parent_qq",
    "stuck_in_spawn_child_qq",
    "stuck_in_forkserver_child_qq",
    "stuck_in_trio_child_qq",
    "stuck_in_orphan_qq",
)


@pytest.mark.skipif(find_py_spy() is None, reason="py-spy is not installed here")
def test_hung_tree_is_reported_and_reaped(tmp_path: Path) -> None:
    script = tmp_path / "tree.py"
    script.write_text(TREE)
    ready = tmp_path / "ready"
    ready.mkdir()
    report = tmp_path / "reports" / "leaks.json"
    env = {k: v for k, v in os.environ.items() if k != "_TRACTOR_RT_VARS"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness",
            "exec",
            "--name",
            "hangtest",
            "--silence",
            "3",
            "--capture-delay",
            "0.5",
            "--leaks",
            "warn",
            "--report",
            str(report),
            "--",
            sys.executable,
            str(script),
            str(ready),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == exit_codes.HUNG, done.stdout + done.stderr
    hang = report.parent / "hang.txt"
    assert f"hang report: {hang}" in done.stderr
    text = hang.read_text()
    for function in FUNCTIONS:
        assert function in text, f"{function} missing from the hang report:\n{text}"
    session = re.search(r"session (hangtest-[0-9a-f]{8})", text)
    assert session, text

    # Nothing of the session is left running, the double-forked orphan
    # included (its pid was written before it blocked).
    roles = ("spawn", "forkserver", "trio", "orphan")
    pids = [int((ready / role).read_text()) for role in roles]
    alive = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
        except psutil.NoSuchProcess:
            continue
        if proc.status() != psutil.STATUS_ZOMBIE and session.group(1) in str(
            proc.environ().get("_TRACTOR_RT_VARS", "")
        ):
            alive.append(pid)
    assert alive == [], f"still running after the hang: {alive}"
