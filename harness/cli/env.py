"""``harness env``: show the envelope of this process or of another one."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

    from harness.rtvars import RuntimeVars

HELP = "show the envelope (_TRACTOR_RT_VARS) of this or another process"

DESCRIPTION = """\
Show the envelope: the runtime vars a harness session hands to every process
through one environment variable (_TRACTOR_RT_VARS unless --name says
otherwise).

Without --pid, the envelope of this command's own environment, so `harness env`
run inside `harness exec` shows the session's. With --pid, the envelope the
process was started with, read from /proc/<pid>/environ.

Fields the process set are shown in full, fields left at their default are
dimmed, and keys this version of the harness does not know (written by a newer
one) are shown in yellow after them: they are kept, never dropped.

exit status:
  0   the envelope was shown
  1   the process has no envelope, does not exist, or its environment
      cannot be read
  85  the envelope is malformed (the message says what and where)
"""

EPILOG = """\
examples:
  harness env                         this shell's envelope, as a table
  harness env --pid 4242              the envelope process 4242 started with
  harness env --pid 4242 --json       the same, as JSON (every field, unknown keys too)
  eval "$(harness env --pid 4242 --export)"
                                      join this shell to process 4242's session
"""


def register(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "env",
        help=HELP,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--pid",
        type=int,
        metavar="PID",
        help="read the envelope of process PID instead of this one's",
    )
    form = parser.add_mutually_exclusive_group()
    form.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: every field (defaults included) and any "
        "unknown keys; tuples become arrays",
    )
    form.add_argument(
        "--export",
        action="store_true",
        help="print a shell line that sets the variable to the envelope, "
        'unchanged (eval "$(harness env --export)")',
    )
    parser.add_argument(
        "--name",
        default=None,
        metavar="VAR",
        help="the environment variable to read (default: _TRACTOR_RT_VARS)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    import os
    import shlex

    import psutil

    from harness.errors import RtVarsError
    from harness.rtvars import RT_VARS_ENV, RuntimeVars, read_raw_rtvars

    name = args.name or RT_VARS_ENV
    env: Mapping[str, str]
    if args.pid is None:
        where = f"this process (pid {os.getpid()})"
        env = os.environ
    else:
        try:
            proc = psutil.Process(args.pid)
            where = _describe(proc)
            env = proc.environ()
        except psutil.ZombieProcess:
            return _fail(
                f"process {args.pid} has exited (a zombie waiting for its parent); "
                "its environment is gone. `harness ps` lists the live processes "
                "of each session."
            )
        except psutil.NoSuchProcess:
            return _fail(
                f"no process with pid {args.pid}. `harness ps` lists the "
                "processes of each session."
            )
        except psutil.AccessDenied:
            return _fail(
                f"not allowed to read the environment of process {args.pid} "
                "(another user's process); run the command as that user or root."
            )

    raw = env.get(name)
    if raw is None:
        return _fail(
            f"{where} has no envelope ({name} is not set): it is not part of a "
            "harness session. Start it with `harness exec -- CMD`."
        )
    try:
        data = read_raw_rtvars({name: raw}, name=name)
    except RtVarsError as exc:
        msg = (
            f"the envelope of {where} is malformed: {exc}. "
            f"`unset {name}` leaves the session."
        )
        raise RtVarsError(msg) from None
    known = {
        key: value
        for key, value in data.items()
        if key in RuntimeVars.__struct_fields__
    }
    unknown = {key: value for key, value in data.items() if key not in known}
    rtvars = RuntimeVars(**known)

    if args.json:
        import msgspec

        full = {**msgspec.structs.asdict(rtvars), **unknown}
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(full)).decode())
        sys.stdout.write("\n")
    elif args.export:
        # The text as the process has it: re-encoding would be equal for the
        # known fields, but this way nothing can be lost or reordered.
        print(f"export {name}={shlex.quote(raw)}")
    else:
        _print_table(
            rtvars,
            set_fields=set(known),
            unknown=unknown,
            raw=raw,
            where=where,
            name=name,
        )
    return 0


def _fail(message: str) -> int:
    print(f"harness env: {message}", file=sys.stderr)
    return 1


def _describe(proc: Any) -> str:
    """``process 4242 (python -m pytest tests)``, the command cut short."""
    import psutil

    try:
        command = " ".join(proc.cmdline()) or proc.name()
    except psutil.Error:
        command = ""
    if len(command) > 60:
        command = command[:57] + "..."
    return f"process {proc.pid} ({command})" if command else f"process {proc.pid}"


def _print_table(
    rtvars: RuntimeVars,
    *,
    set_fields: set[str],
    unknown: dict[str, Any],
    raw: str,
    where: str,
    name: str,
) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # Values are shown as Text, never as markup: an envelope is read from
    # processes the harness does not control, and "[...]" is rich markup.
    table = Table(box=None, pad_edge=False)
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    for field in rtvars.__struct_fields__:
        style = "" if field in set_fields else "dim"
        table.add_row(
            Text(field, style=style), Text(repr(getattr(rtvars, field)), style=style)
        )
    for key, value in unknown.items():
        table.add_row(Text(key, style="yellow"), Text(repr(value), style="yellow"))

    console = Console(soft_wrap=False, highlight=False)
    console.print(Text(f"{name} of {where}", style="bold"), soft_wrap=True)
    console.print(table)
    if unknown:
        console.print(
            Text(
                f"\n{len(unknown)} unknown key(s) in yellow: written by a newer "
                "harness; kept as they are when the envelope is updated.",
                style="yellow",
            )
        )
    console.print(Text("\nraw: ", style="dim") + Text(f"{name}={raw}"))
    console.print(
        Text(
            "dimmed fields are at their default. `harness env --json` for "
            "machines, `--export` for a shell.",
            style="dim",
        )
    )
