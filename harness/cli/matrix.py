"""``harness matrix``: show the test matrix of ``[tool.harness]``."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.matrix import Matrix

HELP = "show the test matrix (nox sessions, GitHub Actions jobs)"

DESCRIPTION = """\
Show the test matrix configured under [tool.harness] in pyproject.toml:
spawn backends x transports (x Python versions), minus exclusions. The nox
sessions tests-<backend>-<transport> and the GitHub Actions matrix are built
from the same table, so what this prints is what runs.
"""

EPILOG = """\
examples:
  harness matrix                 table of sessions, with excluded cells
  harness matrix --list          session names, one per line (nox -s NAME)
  harness matrix --json          {"include": [...]} for a GitHub Actions matrix

In a workflow:
  echo "matrix=$(harness matrix --json)" >> "$GITHUB_OUTPUT"
"""


def register(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "matrix",
        help=HELP,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    form = parser.add_mutually_exclusive_group()
    form.add_argument(
        "--json",
        action="store_true",
        help='print the GitHub Actions matrix {"include": [...]} on one line',
    )
    form.add_argument(
        "--list",
        action="store_true",
        help="print the session names nox takes (nox -s NAME), one per line",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help="the pyproject.toml to read, or a folder to search upwards from "
        "(default: the current directory)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    import json

    from harness.matrix import Matrix

    matrix = Matrix.load(args.config)
    if args.json:
        sys.stdout.write(json.dumps(matrix.github(), separators=(",", ":")) + "\n")
    elif args.list:
        for name in matrix.names():
            print(name)
    else:
        _print_table(matrix)
    return 0


def _print_table(matrix: Matrix) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    config = matrix.config
    console = Console(soft_wrap=False, highlight=False)
    if not console.is_terminal:
        # A pipe or a file gets whole rows rather than 80 folded columns.
        console.width = 160
    table = Table(
        title=escape(f"[tool.harness] of {config.source}"),
        title_justify="left",
        box=None,
        pad_edge=False,
    )
    table.add_column("session", style="bold", no_wrap=True)
    table.add_column("backend", no_wrap=True)
    table.add_column("transport", no_wrap=True)
    table.add_column("python", no_wrap=True)
    table.add_column("tags", no_wrap=True)
    table.add_column("note", style="dim")
    for cell in matrix.cells:
        table.add_row(
            cell.session,
            cell.backend,
            cell.transport,
            ", ".join(cell.pythons) or "(nox's own)",
            ", ".join(cell.tags),
            "",
        )
    for excluded in matrix.excluded:
        reason = excluded.exclusion.reason or "excluded by [tool.harness] exclude"
        table.add_row(
            excluded.session,
            excluded.backend,
            excluded.transport,
            excluded.python or "any",
            "",
            f"excluded: {reason}",
            style="dim",
        )
    console.print(table)

    words = [config.command, *config.flags]
    console.print(f"\n[dim]command:[/dim] {escape(' '.join(words))}")
    runs = matrix.names()
    console.print(
        f"\n{len(runs)} run(s). Next: [bold]nox -s {runs[0]}[/bold] runs one; "
        f"[bold]nox -j auto -t {config.session_prefix}[/bold] runs all at once."
        if runs
        else "\nEvery cell is excluded: nothing runs. Check \\[tool.harness] exclude."
    )
