"""Choosing the sessions a leak verb (``check``, ``ps``, ``reap``) acts on."""

from __future__ import annotations

from harness.errors import HarnessError
from harness.records import SessionRecord, SessionStore, record_state


def not_live(store: SessionStore) -> list[SessionRecord]:
    """Every session whose owner is gone (``stale``) or that was closed with
    leftovers (``leaked``), oldest first."""
    return [r for r in store.list() if record_state(r) != "live"]


def default_sessions(store: SessionStore, verb: str) -> list[SessionRecord]:
    """What a verb given no session acts on: every session that is not live,
    else the only session there is.

    Returns an empty list when there are no sessions at all; raises
    `HarnessError` when only several live sessions exist, naming them.
    """
    records = store.list()
    idle = [r for r in records if record_state(r) != "live"]
    if idle or len(records) <= 1:
        return idle or records
    ids = ", ".join(r.id for r in records)
    msg = (
        f"{len(records)} sessions are live and none is stale ({ids}); name "
        f"one: `harness {verb} SESSION`"
    )
    raise HarnessError(msg)
