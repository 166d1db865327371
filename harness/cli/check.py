"""``harness check``: run the leak check on a session, from outside it."""

from __future__ import annotations

import argparse
import sys
from typing import Any

HELP = "report what a session left behind: processes, socket files, listeners"

DESCRIPTION = """\
Run the leak check on a session: a live one, a stale one (its owner was
killed) or a leaked one (closed with leftovers). It lists

  - processes of the session still running, and how each was found:
    descendant (of the owner), envelope (carries the session's
    _TRACTOR_RT_VARS), socket (holds a socket in its bindspace), port
    (listens on its TCP port);
  - socket files left in the bindspace, live (a listener answers) or stale;
  - listeners still bound to the session's port.

Nothing is changed: `harness reap SESSION` ends and removes what is found.
Without SESSION, every session that is not live is checked (or the only
session there is).

exit status: 0 nothing leaked, 86 something leaked, 85 harness error.
"""


def register(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "check",
        help=HELP,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "session",
        nargs="?",
        metavar="SESSION",
        help="session id or a unique prefix of it (default: every non-live one)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the reports as JSON on stdout"
    )
    parser.add_argument(
        "--report",
        metavar="PATH",
        help="also write the reports as JSON to PATH (atomically)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    from harness import exit_codes
    from harness.cli._select import default_sessions
    from harness.leak_report import make_console, render_reports, to_json, write_report
    from harness.leaks import check_leaks
    from harness.records import SessionStore

    store = SessionStore()
    if args.session:
        records = [store.find(args.session)]
    else:
        records = default_sessions(store, "check")
    reports = [check_leaks(record) for record in records]
    leaked = any(report.leaked for report in reports)
    document = {"leaked": leaked, "sessions": reports}

    if args.report:
        path = write_report(args.report, document)
    if args.json:
        sys.stdout.buffer.write(to_json(document))
        sys.stdout.flush()
    else:
        console = make_console(sys.stdout)
        if not records:
            console.print(
                f"No sessions in {store.dir}; `harness exec -- CMD` starts one."
            )
        render_reports(reports, console)
        if args.report:
            console.print(f"\nJSON report: {path}")
    return exit_codes.LEAKED if leaked else exit_codes.OK
