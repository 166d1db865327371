"""Pruning keeps a stale session whose processes still run, files or not."""

from __future__ import annotations

from pathlib import Path

from leak_sessions import SessionFactory, wait_for

from harness.records import SessionStore
from harness.session import prune_sessions


def test_stale_session_with_a_running_process_is_kept_until_it_ends(
    sessions: SessionFactory, runtime_dir: Path
) -> None:
    stale = sessions("stale")  # its owner has exited; its bindspace is empty
    sleeper = stale.python("import time; time.sleep(60)")
    store = SessionStore(runtime_dir)

    actions = {a.session_id: a for a in prune_sessions(runtime_dir)}
    assert actions[stale.id].action == "kept"
    assert "still run" in actions[stale.id].reason
    assert f"harness reap {stale.id}" in actions[stale.id].reason
    assert store.path(stale.id).exists()
    assert stale.bindspace.exists()

    sleeper.kill()
    sleeper.wait()
    wait_for(lambda: sleeper.poll() is not None)
    actions = {a.session_id: a for a in prune_sessions(runtime_dir)}
    assert actions[stale.id].action == "removed"
    assert not store.path(stale.id).exists()
    assert not stale.bindspace.exists()


def test_an_empty_stack_dump_file_does_not_keep_a_stale_session(
    sessions: SessionFactory, runtime_dir: Path
) -> None:
    # A pytest run killed mid-way leaves the stack-dump file the plugin
    # opened (empty: it never dumped); one that did dump is evidence.
    empty = sessions("emptydump")
    (empty.bindspace / "stacks").mkdir()
    (empty.bindspace / "stacks" / "4242.txt").touch()
    dumped = sessions("dumped")
    (dumped.bindspace / "stacks").mkdir()
    (dumped.bindspace / "stacks" / "4243.txt").write_text("Thread 0x1 ...\n")

    actions = {a.session_id: a for a in prune_sessions(runtime_dir)}
    assert actions[empty.id].action == "removed"
    assert not empty.bindspace.exists()
    assert actions[dumped.id].action == "kept"
    assert (dumped.bindspace / "stacks" / "4243.txt").exists()
