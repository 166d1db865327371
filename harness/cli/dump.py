"""``harness dump``: the Python stacks of every process of a live session."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.hang_report import HangReport
    from harness.records import SessionRecord, SessionStore
    from harness.stacks import Target

HELP = "show the Python stacks of every process of a live session"

DESCRIPTION = """\
Capture the Python stacks of every process of a session, without stopping or
killing anything: the same report the hang watchdog writes, on demand.

Each process is read with py-spy where it can attach (ptrace permission
needed); otherwise, a process that called harness.faulthandler_hook.enable()
is sent its dump signal (the envelope's diag_signal, default SIGUSR2) and its
dump is read from <bindspace>/stacks/<pid>.txt. A signal is only ever sent to
a process that catches it. Processes neither way can read are listed with
the reason.

With --delay, a second snapshot follows and every frame is marked as
unchanged (=) or changed (~) between the two, which tells a stuck process
from a busy one.

Without SESSION: the session of this shell's envelope when there is one,
else the only live session. Exits 0 when every process was captured, 1 when
some could not be (the report says why) or none was found.
"""

EPILOG = """\
examples:
  harness dump                         the only live session, to the terminal
  harness dump tests-trio --delay 2    two snapshots 2 s apart
  harness dump tests-trio --out hang/stacks.txt
"""


def register(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "dump",
        help=HELP,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "session",
        nargs="?",
        metavar="SESSION",
        help="session id or a unique prefix of it (default: see above)",
    )
    parser.add_argument(
        "--out",
        metavar="PATH",
        help="write the report to PATH and print a summary (default: print "
        "the whole report)",
    )
    parser.add_argument(
        "--delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="take a second snapshot SECONDS after the first and mark what "
        "did not move (default: one snapshot)",
    )
    parser.add_argument(
        "--no-py-spy",
        action="store_true",
        help="do not use py-spy, only the faulthandler signal (as "
        "HARNESS_PY_SPY= does)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from harness import exit_codes
    from harness.errors import HarnessError
    from harness.hang_report import report_hang
    from harness.records import SessionStore, record_state
    from harness.stacks import AUTO

    if args.delay < 0:
        msg = f"--delay must be 0 or more seconds, got {args.delay!r}"
        raise HarnessError(msg)
    store = SessionStore()
    record = _choose(store, args.session)
    if record_state(record) != "live":
        print(
            f"harness dump: session {record.id} is {record_state(record)}: its "
            "owner is gone; its leftover processes are dumped anyway.",
            file=sys.stderr,
        )
    out = Path(args.out).resolve() if args.out else None
    report = report_hang(
        None,
        session_id=record.id,
        targets=lambda: session_targets(record),
        delay=args.delay,
        path=out,
        command=record.command,
        py_spy=None if args.no_py_spy else AUTO,
        bindspace=record.bindspace,
    )
    latest = report.second or report.first
    if out is None:
        sys.stdout.write(report.text)
    else:
        _print_summary(report, record)
    if not latest.processes:
        print(
            f"harness dump: no process of session {record.id} was found; "
            "`harness ps` shows what the session holds.",
            file=sys.stderr,
        )
        return 1
    missing = [p for p in latest.processes if not p.captured]
    return 1 if missing else exit_codes.OK


def session_targets(record: SessionRecord) -> list[Target]:
    """The session's processes, the owner first while it runs."""
    from harness.leaks import session_processes

    return list(session_processes(record))


def _choose(store: SessionStore, session: str | None) -> SessionRecord:
    from harness.errors import HarnessError
    from harness.records import record_state
    from harness.rtvars import load_rtvars

    if session:
        return store.find(session)
    own = load_rtvars(missing_ok=True).session
    if own:
        return store.find(own)
    live = [r for r in store.list() if record_state(r) == "live"]
    if len(live) == 1:
        return live[0]
    if not live:
        msg = (
            f"no live session in {str(store.dir)!r}; start one with "
            "`harness exec -- CMD`, or name a stale one: `harness dump SESSION`"
        )
    else:
        ids = ", ".join(r.id for r in live)
        msg = f"{len(live)} sessions are live ({ids}); name one: `harness dump SESSION`"
    raise HarnessError(msg)


def _print_summary(report: HangReport, record: SessionRecord) -> None:
    from rich.console import Console
    from rich.table import Table

    latest = report.second or report.first
    table = Table(
        title=f"Stacks of session {record.id}",
        title_justify="left",
        box=None,
        pad_edge=False,
    )
    for name in ("pid", "how", "method", "threads", "innermost call (main thread)"):
        table.add_column(name, no_wrap=name != "innermost call (main thread)")
    for proc in latest.processes:
        if proc.captured and proc.threads:
            main = next(
                (t for t in proc.threads if t.name == "MainThread"), proc.threads[-1]
            )
            top = main.frames[0] if main.frames else None
            where = f"{top.function}  {top.where()}" if top else "(no Python frame)"
            table.add_row(
                str(proc.pid), proc.how, proc.method, str(len(proc.threads)), where
            )
        else:
            table.add_row(
                str(proc.pid),
                proc.how,
                "[red]none[/red]",
                "-",
                proc.error or "",
            )
    # Off a terminal rich assumes 80 columns; a log keeps full paths instead.
    console = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 200)
    console.print(table)
    console.print(f"\nReport: {report.path}", highlight=False)
    console.print(
        f"Next: read it (less {report.path}); `harness dump {record.id} --delay 2` "
        "shows which frames are stuck.",
        highlight=False,
    )
