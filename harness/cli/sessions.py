"""``harness sessions``: list the sessions of this host, prune stale ones."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.records import SessionRecord
    from harness.session import PruneAction

HELP = "list live, stale and leaked sessions; --prune clears stale ones"

DESCRIPTION = """\
List the sessions of this runtime dir: one row per session with its id, its
state, the owner process, the leased port, the bindspace (full path), its age
and the command it runs.

states:
  live     the owner process runs
  stale    the owner died without closing the session (SIGKILL, OOM)
  leaked   the owner closed the session but kept it: the leak check found
           leftovers (run `harness check ID`)
  orphan   a bindspace without a record: its owner died while opening it

--prune removes stale sessions and orphan bindspaces that hold no file any
more (their port leases died with their owners) and says what it kept and
why. Live and leaked sessions are never touched.
"""


def register(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "sessions",
        help=HELP,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print JSON for machines")
    parser.add_argument(
        "--prune",
        action="store_true",
        help="remove stale sessions and orphan bindspaces that left nothing behind",
    )
    parser.add_argument(
        "--bindspace-folder",
        default="tractor",
        metavar="F",
        help="folder under the runtime dir that holds bindspaces (default: tractor)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    from harness.records import SessionStore
    from harness.runtime_dir import runtime_dir
    from harness.session import orphan_bindspaces, prune_sessions

    rt = runtime_dir()
    if args.prune:
        actions = prune_sessions(rt, folder=args.bindspace_folder)
        if args.json:
            _print_json([_action_dict(a) for a in actions])
        else:
            _print_prune(actions, rt)
        return 0

    store = SessionStore(rt)
    records = store.list()
    orphans = orphan_bindspaces(rt, records, folder=args.bindspace_folder)
    rows = [_record_row(r) for r in records] + [_orphan_row(p) for p in orphans]
    if args.json:
        _print_json(rows)
    elif not rows:
        print(
            f"No sessions in {rt} (records in {store.dir}). "
            "Start one with `harness exec -- CMD`."
        )
    else:
        _print_table(rows, rt)
    return 0


# ---------------------------------------------------------------- rows


def _record_row(record: SessionRecord) -> dict[str, Any]:
    import msgspec

    from harness.records import record_state

    row: dict[str, Any] = msgspec.to_builtins(record)
    row["state"] = record_state(record)
    row["age"] = max(time.time() - record.started_at, 0.0)
    return row


def _orphan_row(bindspace: Path) -> dict[str, Any]:
    try:
        age = max(time.time() - bindspace.lstat().st_mtime, 0.0)
    except OSError:
        age = None
    return {
        "id": bindspace.name,
        "state": "orphan",
        "owner_pid": None,
        "port": None,
        "bindspace": str(bindspace),
        "age": age,
        "command": [],
    }


def _action_dict(action: PruneAction) -> dict[str, Any]:
    return {
        "id": action.session_id,
        "action": action.action,
        "reason": action.reason,
        "bindspace": str(action.bindspace),
        "port": action.port,
    }


# ---------------------------------------------------------------- output


def _print_json(data: Any) -> None:
    import json

    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
    return f"{seconds // 86400}d{seconds // 3600 % 24:02d}h"


_STATE_STYLE = {"live": "green", "stale": "yellow", "leaked": "red", "orphan": "red"}


def _console() -> Any:
    from rich.console import Console

    # Paths are shown in full: off a terminal, do not wrap at 80 columns.
    return Console(width=None if sys.stdout.isatty() else 400, highlight=False)


def _print_table(rows: list[dict[str, Any]], rt: Path) -> None:
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("id", "state", "owner", "port", "bindspace", "age", "command"):
        table.add_column(
            column,
            overflow="fold",
            justify="right" if column in ("owner", "port", "age") else "left",
        )
    for row in rows:
        state = row["state"]
        table.add_row(
            row["id"],
            f"[{_STATE_STYLE[state]}]{state}[/]",
            str(row["owner_pid"] or "-"),
            str(row["port"] or "-"),
            row["bindspace"],
            _age(row["age"]),
            _command(row["command"]),
        )
    console = _console()
    console.print(f"Sessions in {rt}:")
    console.print(table)
    states = {row["state"] for row in rows}
    if states & {"stale", "orphan"}:
        console.print(
            "\nNext: `harness sessions --prune` removes stale sessions that left "
            "nothing behind; `harness check ID` shows what a session left."
        )
    elif "leaked" in states:
        console.print("\nNext: `harness check ID` shows what a leaked session left.")


def _command(argv: list[str]) -> str:
    import shlex

    # One line per session: newlines inside arguments are shown as spaces.
    return " ".join(shlex.join(argv).split()) if argv else "-"


def _print_prune(actions: list[PruneAction], rt: Path) -> None:
    from rich.table import Table

    console = _console()
    if not actions:
        console.print(f"Nothing to prune: no stale session in {rt}.")
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("id", "action", "port", "bindspace", "reason"):
        table.add_column(column, overflow="fold")
    for action in actions:
        style = "green" if action.action == "removed" else "yellow"
        table.add_row(
            action.session_id,
            f"[{style}]{action.action}[/]",
            str(action.port or "-"),
            str(action.bindspace),
            action.reason,
        )
    removed = sum(a.action == "removed" for a in actions)
    kept = [a for a in actions if a.action == "kept"]
    console.print(f"Pruned {removed} of {len(actions)} stale session(s) in {rt}:")
    console.print(table)
    if kept:
        first = kept[0].session_id
        console.print(
            f"\nKept {len(kept)} with leftovers for the leak check. Next: "
            f"`harness check {first}` to see them, `harness reap --stale` to "
            "end their processes, then `harness sessions --prune` again."
        )
