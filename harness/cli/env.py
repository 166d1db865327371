"""``harness env``: show the envelope of this process or of another one."""

from __future__ import annotations

import argparse
import sys
from typing import Any

HELP = "show the envelope (_TRACTOR_RT_VARS) of this or another process"

DESCRIPTION = """\
Show the envelope: the runtime vars a harness session hands to every process
through one environment variable. Without --pid, this process's own (so
`harness env` inside `harness exec` shows the session's). Exits with status 1
when the process has no envelope.
"""


def register(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "env",
        help=HELP,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pid", type=int, help="read the envelope of process PID")
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print JSON for machines")
    form.add_argument(
        "--export",
        action="store_true",
        help="print a shell line that sets the variable "
        '(eval "$(harness env --export)")',
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

    import msgspec
    import psutil

    from harness.rtvars import RT_VARS_ENV, dump_rtvars, load_rtvars

    name = args.name or RT_VARS_ENV
    where = "this process"
    try:
        if args.pid is None:
            env: dict[str, str] | Any = None
        else:
            where = f"process {args.pid}"
            env = psutil.Process(args.pid).environ()
    except psutil.NoSuchProcess:
        print(f"harness env: no process with pid {args.pid}", file=sys.stderr)
        return 1
    except psutil.AccessDenied:
        print(
            f"harness env: not allowed to read the environment of process "
            f"{args.pid} (another user's process; try as that user or root)",
            file=sys.stderr,
        )
        return 1

    rtvars = load_rtvars(env, missing_ok=True, name=name)
    present = (env if env is not None else os.environ).get(name)
    if present is None:
        print(
            f"harness env: {where} has no envelope ({name} is not set); it is not "
            "part of a harness session. Start it with `harness exec -- CMD`.",
            file=sys.stderr,
        )
        return 1

    if args.json:
        sys.stdout.write(
            msgspec.json.format(msgspec.json.encode(_full(rtvars))).decode()
        )
        sys.stdout.write("\n")
    elif args.export:
        var, value = dump_rtvars(rtvars, name=name)
        print(f"export {var}={shlex.quote(value)}")
    else:
        _print_table(rtvars, present, where, name)
    return 0


def _full(rtvars: Any) -> dict[str, Any]:
    import msgspec

    return {f.name: getattr(rtvars, f.name) for f in msgspec.structs.fields(rtvars)}


def _print_table(rtvars: Any, raw: str, where: str, name: str) -> None:
    from rich.console import Console
    from rich.table import Table

    set_fields = set(rtvars.to_dict())
    table = Table(
        title=f"{name} of {where}", title_justify="left", box=None, pad_edge=False
    )
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for field in rtvars.__struct_fields__:
        value = getattr(rtvars, field)
        style = None if field in set_fields else "dim"
        table.add_row(field, repr(value), style=style)
    console = Console(soft_wrap=False)
    console.print(table)
    console.print(f"\n[dim]raw:[/dim] {name}={raw}", highlight=False, markup=True)
