"""``harness exec``: run a command inside a new session."""

from __future__ import annotations

import argparse
import sys
from typing import Any

HELP = "run a command inside a new session (lease, bindspace, envelope)"

DESCRIPTION = """\
Run CMD inside a new session and exit with its status.

The session leases a registry port no other session on this host holds,
creates a private bindspace <runtime-dir>/<folder>/<session-id>/ for Unix
sockets, and hands CMD one envelope in $_TRACTOR_RT_VARS (session id,
registry address, backend, transport, bindspace) that every child inherits.
CMD also sees XDG_RUNTIME_DIR=<bindspace>, so a runtime that keeps its
sockets under $XDG_RUNTIME_DIR (tractor does) binds them inside the session,
and HARNESS_RUNTIME_DIR=<runtime-dir>, so harness commands run inside still
see the host's sessions.

SIGINT, SIGTERM and SIGHUP sent to `harness exec` are passed on to CMD (a
Ctrl-C in the terminal reaches CMD directly and is not sent twice).
Processes that CMD leaves orphaned are adopted and waited for.

After CMD exits, the session is checked for leaks: with none, its bindspace,
record and lease are gone; with some, the bindspace and record stay for
`harness sessions` and `harness check`.

exit status: CMD's own; 128+N when signal N killed it; 127 when CMD is not
found, 126 when it is not executable; 85 when the session could not be
opened; 86 when CMD passed but the session leaked and --leaks is fail;
87 when a hang limit (--timeout, --silence) was hit.
"""

EPILOG = """\
examples:
  harness exec -- pytest tests -x
  harness exec --name tests-trio-uds --backend trio --transport uds -- \\
      pytest tests --spawn-backend=trio --tpt-proto=uds
  harness exec -- harness env          show the envelope CMD receives
"""


def register(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "exec",
        help=HELP,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="harness exec [OPTIONS] -- CMD [ARGS...]",
    )
    parser.add_argument(
        "--name",
        default="session",
        help="start of the session id, e.g. the nox session name "
        "(sanitized to [A-Za-z0-9_.-]; default: session)",
    )
    parser.add_argument(
        "--backend",
        default=None,
        metavar="B",
        help="spawn backend put in the envelope (trio, mp_spawn, mp_forkserver)",
    )
    parser.add_argument(
        "--transport",
        choices=("tcp", "uds"),
        default=None,
        help="transport of the session's registry address (default: tcp)",
    )
    parser.add_argument(
        "--bindspace-folder",
        default="tractor",
        metavar="F",
        help="folder under the runtime dir that holds bindspaces (default: tractor)",
    )
    parser.add_argument(
        "--leaks",
        choices=("fail", "warn", "reap"),
        default=None,
        help="what a leak does to the exit status: fail (exit 86 if CMD "
        "passed), warn (report only) or reap (terminate what leaked); "
        "default: fail when $CI is true, else warn",
    )
    parser.add_argument(
        "--report",
        default=None,
        metavar="PATH",
        help="write the session's leak report (JSON) to PATH; a hang report "
        "goes beside it as hang.txt",
    )
    parser.add_argument(
        "--isolate",
        action="append",
        default=None,
        metavar="LEVEL",
        help="run CMD in private kernel namespaces: net (own loopback, so a "
        "hard-coded port such as 1616 cannot collide), pid (also: nothing CMD "
        "starts outlives the session), auto (what this host permits), none; "
        "repeat or comma-separate (default: none)",
    )
    hang = parser.add_argument_group(
        "hang limits",
        "When a limit is hit, the stacks of every process of the session are "
        "captured twice (--capture-delay apart) into a hang report, the "
        "session's processes are reaped and harness exec exits 87.",
    )
    hang.add_argument(
        "--timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="wall-clock limit of the session",
    )
    hang.add_argument(
        "--silence",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="limit on time without output from CMD (its output is then "
        "copied through the harness, through a pty when stdout is a terminal)",
    )
    hang.add_argument(
        "--capture-delay",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="time between the two stack snapshots of a hang (default: 2)",
    )
    parser.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="CMD",
        help="the command to run, after --",
    )
    return parser


def _seconds(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value > 0 and math.isfinite(value)):
        msg = f"expected a positive number of seconds, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _isolation_levels(values: list[str] | None) -> tuple[str, ...]:
    levels: list[str] = []
    for value in values or ():
        levels.extend(part.strip() for part in value.split(",") if part.strip())
    return tuple(level for level in levels if level != "none")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from harness.runner import (
        CommandNotRunnable,
        RunOptions,
        default_leak_mode,
        run_command,
    )

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    options = RunOptions(
        name=args.name,
        backend=args.backend,
        transport=args.transport,
        bindspace_folder=args.bindspace_folder,
        leaks=args.leaks or default_leak_mode(),
        report=Path(args.report) if args.report else None,
        isolate=_isolation_levels(args.isolate),
        rtvars=_diag_fields(args),
    )
    try:
        return run_command(command, options)
    except CommandNotRunnable as exc:
        print(f"harness exec: {exc}", file=sys.stderr)
        return exc.status


def _diag_fields(args: argparse.Namespace) -> dict[str, float]:
    """The hang limits, as the envelope fields every process can read."""
    fields = {
        "diag_on_hang": args.timeout,
        "diag_silence": args.silence,
        "diag_capture_delay": args.capture_delay,
    }
    return {name: value for name, value in fields.items() if value is not None}
