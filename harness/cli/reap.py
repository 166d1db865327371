"""``harness reap``: end what a session leaked and remove its leftovers."""

from __future__ import annotations

import argparse
import sys
from typing import Any

HELP = "end a session's leaked processes and remove its stale sockets"

DESCRIPTION = """\
Reap a session: end its leaked processes, whole trees, leaves first (SIGINT,
then SIGTERM, then SIGKILL, each followed by --grace seconds), remove stale
socket files from its bindspace, and, once nothing is left and its owner is
gone, remove the bindspace and the session record.

Only processes the leak check attributes to the session are signalled, only
this user's, and each only after its pid and start time are checked again,
so a recycled pid is never hit. A socket file something still listens on is
left to its owner.

Choose the sessions: SESSION (an id or a unique prefix), --stale (every
session whose owner is gone), or --all-mine (every session of this user in
this runtime dir). With none of these: the only session whose owner is gone.
A live session (its owner still runs) is reaped only with --force.

exit status: 0 nothing left, 86 something survived, 85 harness error.
"""

DEFAULT_GRACE = 3.0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 3600:
        msg = f"expected seconds between 0 and 3600, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def register(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "reap",
        help=HELP,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "session",
        nargs="?",
        metavar="SESSION",
        help="session id or a unique prefix of it",
    )
    which.add_argument(
        "--stale",
        action="store_true",
        help="every session whose owner is gone (stale or leaked)",
    )
    which.add_argument(
        "--all-mine",
        action="store_true",
        help="every session of this user in this runtime dir",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="say what would be signalled and removed; change nothing",
    )
    parser.add_argument(
        "--grace",
        type=_seconds,
        default=DEFAULT_GRACE,
        metavar="SECONDS",
        help=f"wait after each signal (default {DEFAULT_GRACE:g})",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="reap live sessions too (their owner still runs)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the results as JSON on stdout"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    import os

    from harness import exit_codes
    from harness.cli._select import not_live
    from harness.errors import HarnessError
    from harness.leak_report import make_console, render_reap, to_json
    from harness.reap import reap_session
    from harness.records import SessionStore, record_state

    store = SessionStore()
    console = make_console(sys.stdout)
    if args.session:
        records = [store.find(args.session)]
    elif args.stale:
        records = not_live(store)
    elif args.all_mine:
        records = [r for r in store.list() if r.uid == os.getuid()]
    else:
        records = not_live(store)
        if len(records) > 1:
            ids = ", ".join(r.id for r in records)
            msg = (
                f"{len(records)} sessions have no owner any more ({ids}); name "
                "one, or pass --stale to reap them all"
            )
            raise HarnessError(msg)

    live = [r for r in records if record_state(r) == "live"]
    if live and not args.force:
        if args.session:
            record = live[0]
            msg = (
                f"session {record.id!r} is live: its owner {record.owner_pid} "
                "still runs. Stop the owner first (it checks for leaks as it "
                f"ends), or pass --force to reap its processes now"
            )
            raise HarnessError(msg)
        for record in live:
            console.print(f"Skipping live session {record.id} (--force reaps it).")
        records = [r for r in records if r not in live]

    if not records and not args.json:
        console.print(f"No sessions to reap in {store.dir}.")
    results = []
    for index, record in enumerate(records):
        result = reap_session(record, grace=args.grace, dry_run=args.dry_run)
        results.append(result)
        if not args.json:
            if index:
                console.print()
            render_reap(result, console)
    if args.json:
        sys.stdout.buffer.write(to_json({"sessions": results}))
        sys.stdout.flush()
    if args.dry_run:
        return exit_codes.OK
    return exit_codes.OK if all(r.clean for r in results) else exit_codes.LEAKED
