"""Capturing the stacks of a real process tree, with py-spy and without it.

The tree is one process per way a runtime starts processes: the parent, a
``multiprocessing`` 'spawn' child, a 'forkserver' child, a
``trio.run_process`` child and a double-forked orphan. Each one blocks in a
function with a name found nowhere else, so the captured stacks prove which
process they came from.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from harness.faulthandler_hook import resolve_signal
from harness.hang_report import (
    render_hang_report,
    take_snapshots,
    unchanged_depth,
)
from harness.rtvars import RT_VARS_ENV, RuntimeVars, dump_rtvars
from harness.stacks import (
    ProcessStacks,
    Target,
    capture_process,
    capture_stacks,
    catches_signal,
    find_py_spy,
    parse_faulthandler,
)

TREE_SCRIPT = textwrap.dedent(
    '''
    """A process tree that blocks everywhere, for the capture tests."""
    import multiprocessing
    import os
    import sys
    import threading
    import time
    from pathlib import Path

    from harness.faulthandler_hook import enable

    READY = Path(sys.argv[2])


    def ready(role):
        (READY / f"{role}.tmp").write_text(str(os.getpid()))
        os.replace(READY / f"{role}.tmp", READY / role)


    def block_here_spawn_xyz():
        enable()
        ready("spawn")
        time.sleep(600)


    def block_here_forkserver_xyz():
        enable()
        ready("forkserver")
        time.sleep(600)


    def block_here_trio_xyz():
        enable()
        ready("trio")
        time.sleep(600)


    def block_here_orphan_xyz():
        ready("orphan")
        time.sleep(600)


    def block_here_parent_xyz():
        ready("parent")
        threading.Event().wait()


    def run_trio_child():
        import trio

        async def main():
            await trio.run_process(
                [sys.executable, __file__, "trio-child", str(READY)], check=False
            )

        trio.run(main)


    if __name__ == "__main__":
        if sys.argv[1] == "trio-child":
            block_here_trio_xyz()
            sys.exit(0)
        enable()
        for method, target in (
            ("spawn", block_here_spawn_xyz),
            ("forkserver", block_here_forkserver_xyz),
        ):
            multiprocessing.get_context(method).Process(target=target).start()
        threading.Thread(target=run_trio_child, daemon=True).start()
        # The double fork: the middle process exits at once, so the orphan
        # is re-parented and keeps only its envelope to say where it is from.
        middle = os.fork()
        if middle == 0:
            if os.fork() == 0:
                block_here_orphan_xyz()
            os._exit(0)
        os.waitpid(middle, 0)
        block_here_parent_xyz()
    '''
)

ROLES = ("parent", "spawn", "forkserver", "trio", "orphan")


@dataclass
class Tree:
    parent: subprocess.Popen[bytes]
    pids: dict[str, int]
    bindspace: Path
    started: list[psutil.Process] = field(default_factory=list)

    def targets(self) -> list[Target]:
        """Every live process of the tree, the helpers included."""
        found: list[Target] = []
        try:
            root = psutil.Process(self.parent.pid)
            found.append((root, "owner"))
            found.extend((child, "descendant") for child in root.children(True))
        except psutil.NoSuchProcess:
            pass
        found.append((self.pids["orphan"], "envelope"))
        return found


def _start_tree(folder: Path) -> Tree:
    script = folder / "tree.py"
    script.write_text(TREE_SCRIPT)
    ready = folder / "ready"
    ready.mkdir()
    bindspace = folder / "bindspace"
    bindspace.mkdir(mode=0o700)
    name, value = dump_rtvars(
        RuntimeVars(session="test-stacks-0001", bindspace=str(bindspace))
    )
    env = {**os.environ, name: value}
    parent = subprocess.Popen(
        [sys.executable, str(script), "parent", str(ready)], env=env, cwd=folder
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if all((ready / role).exists() for role in ROLES):
            break
        if parent.poll() is not None:
            pytest.fail(f"the tree's parent exited early with {parent.returncode}")
        time.sleep(0.05)
    else:
        missing = [role for role in ROLES if not (ready / role).exists()]
        _stop_tree(parent, [])
        pytest.fail(f"the tree did not start within 60 s; missing: {missing}")
    pids = {role: int((ready / role).read_text()) for role in ROLES}
    tree = Tree(parent, pids, bindspace)
    # psutil.Process remembers each creation time, so the kill at the end
    # can never hit a process that reused one of these pids.
    tree.started = [psutil.Process(pid) for pid in pids.values()]
    with contextlib.suppress(psutil.NoSuchProcess):
        tree.started += psutil.Process(parent.pid).children(recursive=True)
    return tree


def _stop_tree(parent: subprocess.Popen[bytes], started: list[psutil.Process]) -> None:
    """Kill what this test started: the parent's tree and the orphan."""
    procs = list(started)
    with contextlib.suppress(psutil.NoSuchProcess):
        procs += psutil.Process(parent.pid).children(recursive=True)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    parent.kill()
    psutil.wait_procs(procs, timeout=10)
    parent.wait(timeout=10)


@pytest.fixture(scope="module")
def tree() -> Iterator[Tree]:
    folder = Path(tempfile.mkdtemp(prefix="hstk-", dir="/tmp"))
    started = _start_tree(folder)
    try:
        yield started
    finally:
        _stop_tree(started.parent, started.started)
        leftover = [pid for pid in started.pids.values() if psutil.pid_exists(pid)]
        shutil.rmtree(folder, ignore_errors=True)
        assert not [
            pid
            for pid in leftover
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        ], f"processes of the tree still run: {leftover}"


def _functions(stacks: ProcessStacks) -> set[str]:
    return {frame.function for thread in stacks.threads for frame in thread.frames}


def _by_pid(results: list[ProcessStacks]) -> dict[int, ProcessStacks]:
    return {r.pid: r for r in results}


needs_py_spy = pytest.mark.skipif(
    find_py_spy() is None, reason="py-spy is not installed here"
)


@needs_py_spy
def test_py_spy_names_the_blocking_function_of_every_process(tree: Tree) -> None:
    results = _by_pid(capture_stacks(tree.targets()))
    for role, pid in tree.pids.items():
        stacks = results[pid]
        assert stacks.method == "py-spy", (role, stacks.error)
        assert f"block_here_{role}_xyz" in _functions(stacks), role
    assert results[tree.parent.pid].how == "owner"
    assert results[tree.pids["orphan"]].ppid != tree.parent.pid


def test_faulthandler_fallback_names_the_blocking_function(tree: Tree) -> None:
    results = _by_pid(capture_stacks(tree.targets(), py_spy=None))
    for role, pid in tree.pids.items():
        stacks = results[pid]
        assert stacks.method == "faulthandler", (role, stacks.error)
        assert f"block_here_{role}_xyz" in _functions(stacks), role
        assert (tree.bindspace / "stacks" / f"{pid}.txt").is_file()


def test_fallback_via_empty_env_var(
    tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HARNESS_PY_SPY", "")
    assert find_py_spy() is None
    stacks = capture_process((tree.pids["orphan"], "envelope"))
    assert stacks.method == "faulthandler", stacks.error
    assert "block_here_orphan_xyz" in _functions(stacks)
    assert any("HARNESS_PY_SPY is empty" in note for note in stacks.notes)


def test_helpers_without_a_handler_are_listed_with_the_reason(tree: Tree) -> None:
    # The forkserver server and the resource tracker never called enable().
    named = set(tree.pids.values())
    helpers = [t for t in tree.targets() if _pid(t) not in named]
    assert helpers, "multiprocessing started no helper process"
    for stacks in capture_stacks(helpers, py_spy=None):
        assert not stacks.captured
        assert "no handler registered for SIGUSR2" in (stacks.error or "")


def _pid(target: Target) -> int:
    spec = target[0]
    return spec.pid if isinstance(spec, psutil.Process) else int(spec)


def test_capture_leaves_every_process_running(tree: Tree) -> None:
    capture_stacks(tree.targets(), py_spy=None)
    for role, pid in tree.pids.items():
        assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE, role


def test_two_snapshots_mark_the_blocked_frames_as_unchanged(tree: Tree) -> None:
    named = [(pid, role) for role, pid in tree.pids.items()]
    first, second = take_snapshots(named, delay=0.3, py_spy=None)
    assert second is not None
    text = render_hang_report(session_id="test-stacks-0001", first=first, second=second)
    for role in ROLES:
        marked = [
            line for line in text.splitlines() if f"block_here_{role}_xyz" in line
        ]
        assert marked, role
        assert all(line.lstrip().startswith("=") for line in marked), marked
    assert "STUCK" in text


def test_exited_process_is_reported_not_raised() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    stacks = capture_process((proc.pid, "descendant"), py_spy=None)
    assert not stacks.captured
    assert "exited" in (stacks.error or "")


@needs_py_spy
def test_non_python_process_is_named_as_such(tmp_path: Path) -> None:
    sleep = shutil.which("sleep")
    if sleep is None:
        pytest.skip("no sleep(1) here")
    proc = subprocess.Popen([sleep, "30"])
    try:
        stacks = capture_process((proc.pid, "descendant"))
        assert not stacks.captured
        assert "not a Python process" in (stacks.error or "")
    finally:
        proc.kill()
        proc.wait()


def test_signal_is_not_sent_to_a_process_without_a_handler() -> None:
    # SIGUSR2's default action terminates: the capturer must check first.
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)"],
        env={**os.environ, RT_VARS_ENV: repr({"bindspace": "/tmp"})},
    )
    try:
        time.sleep(0.2)
        sig = resolve_signal(None)
        assert catches_signal(proc.pid, sig) is False
        stacks = capture_process((proc.pid, "descendant"), py_spy=None)
        assert not stacks.captured
        assert proc.poll() is None, "the capture killed the process"
    finally:
        proc.kill()
        proc.wait()


def test_parse_faulthandler_reads_every_thread() -> None:
    text = (
        "Thread 0x00007f85b2e846c0 (most recent call first):\n"
        '  File "/w/t.py", line 3 in worker\n'
        '  File "/usr/lib/threading.py", line 982 in run\n'
        "\n"
        "Current thread 0x00007f85b39d8b80 (most recent call first):\n"
        '  File "/w/t.py", line 5 in main\n'
        '  File "/w/t.py", line 10 in <module>\n'
    )
    threads = parse_faulthandler(text)
    assert [t.ident for t in threads] == ["0x00007f85b2e846c0", "0x00007f85b39d8b80"]
    assert [f.function for f in threads[1].frames] == ["main", "<module>"]
    assert threads[1].state == "current"
    assert threads[0].frames[1].lineno == 982


def test_unchanged_depth_counts_from_the_outermost_frame() -> None:
    from harness.stacks import Frame, ThreadStack

    outer = Frame("<module>", "m.py", 1)
    mid = Frame("serve", "m.py", 5)
    before = ThreadStack("0x1", None, (Frame("recv", "s.py", 9), mid, outer))
    after = ThreadStack("0x1", None, (Frame("send", "s.py", 20), mid, outer))
    assert unchanged_depth(before, after) == 2
    assert unchanged_depth(before, before) == 3
    assert unchanged_depth(None, after) is None


def test_envelope_signal_is_used_and_reported(tmp_path: Path) -> None:
    bindspace = tmp_path / "b"
    bindspace.mkdir()
    code = textwrap.dedent(
        """
        import sys, time
        from harness.faulthandler_hook import enable
        def block_here_winch_xyz():
            # Ready only once inside: a capture before would miss the frame.
            print(enable(), flush=True)
            time.sleep(60)
        block_here_winch_xyz()
        """
    )
    env = {
        **os.environ,
        RT_VARS_ENV: repr({"bindspace": str(bindspace), "diag_signal": "SIGWINCH"}),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        path = proc.stdout.readline().strip()
        assert path == str(bindspace / "stacks" / f"{proc.pid}.txt")
        stacks = capture_process((proc.pid, "descendant"), py_spy=None)
        assert stacks.method == "faulthandler", stacks.error
        assert "block_here_winch_xyz" in _functions(stacks)
    finally:
        proc.kill()
        proc.wait()
