"""``harness ps``: a session's processes as a tree."""

from __future__ import annotations

import argparse
import sys
from typing import Any

HELP = "show a session's processes as a tree, with how each was found"

DESCRIPTION = """\
Show the processes of a session as a tree under its owner, each with how it
was attributed to the session (descendant, envelope, socket, port), its
status, age and the session sockets it holds. Processes whose parent is gone
(re-parented to init or to another subreaper) hang from the session itself.

Without SESSION, every known session is shown.
"""


def register(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "ps",
        help=HELP,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "session",
        nargs="?",
        metavar="SESSION",
        help="session id or a unique prefix of it (default: every session)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    from harness import exit_codes
    from harness.leak_report import make_console, process_tree
    from harness.leaks import check_leaks
    from harness.records import SessionStore

    store = SessionStore()
    records = [store.find(args.session)] if args.session else store.list()
    console = make_console(sys.stdout)
    if not records:
        console.print(f"No sessions in {store.dir}; `harness exec -- CMD` starts one.")
    for record in records:
        console.print(process_tree(check_leaks(record)))
    return exit_codes.OK
