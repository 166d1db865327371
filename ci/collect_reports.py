"""One overview of many legs: a table of verdicts, then what went wrong.

    python ci/collect_reports.py artifacts/      # downloaded reports-* artifacts
    python ci/collect_reports.py reports/ --output reports/ci-summary.md

Finds every leg under the folder (each ``leg.json`` written by
``ci/run_leg.py``), and writes the overview to ``--output``, else to
``$GITHUB_STEP_SUMMARY``, and prints an aligned table. Exits 0; with
``--strict``, 1 when a leg did not pass and 2 when no leg was found.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cli_support import setup_logging, write_summary
from leg_reports import LegReport, find_legs
from summary_markdown import ICONS, duration, headline, leg_title, render_overview


def print_table(legs: Sequence[LegReport], *, title: str) -> None:
    """The legs' verdicts as an aligned table on stdout."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(soft_wrap=False, highlight=False)
    if not console.is_terminal:
        console.width = 160
    table = Table(
        title=escape(f"{title}: {headline(legs)}"), title_justify="left", box=None
    )
    table.add_column("leg", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    for column in ("passed", "failed", "errors", "skipped", "leaks", "duration"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("reports", no_wrap=True)
    for leg in legs:
        tests = bool(leg.junit)
        table.add_row(
            escape(leg_title(leg)),
            f"{ICONS[leg.verdict]} {leg.verdict}",
            str(leg.passed) if tests else "-",
            str(leg.failed) if tests else "-",
            str(leg.errors) if tests else "-",
            str(leg.skipped) if tests else "-",
            str(leg.leak_count),
            duration(leg.duration),
            escape(str(leg.folder)),
        )
    console.print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python ci/collect_reports.py",
        description=(__doc__ or "").split("\n\n", 1)[0],
    )
    parser.add_argument(
        "root", type=Path, help="folder holding the legs' reports (searched deeply)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="append the Markdown here (default: $GITHUB_STEP_SUMMARY, else none)",
    )
    parser.add_argument(
        "--details",
        choices=("failed", "all", "none"),
        default="failed",
        help="which legs get their full section after the table (default: failed)",
    )
    parser.add_argument("--title", default="Test sessions", help="the heading")
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 if a leg did not pass"
    )
    parser.add_argument("-v", "--verbose", action="count", default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    legs = find_legs(args.root) if args.root.is_dir() else []
    details = {"failed": None, "all": True, "none": False}[args.details]
    markdown = render_overview(legs, base=Path.cwd(), details=details, title=args.title)
    write_summary(markdown, path=args.output)
    print_table(legs, title=args.title)
    if not legs:
        print(
            f"\nNo leg reports (leg.json) under {str(args.root.resolve())!r}.",
            file=sys.stderr,
        )
        return 2 if args.strict else 0
    if args.strict and not all(leg.ok for leg in legs):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
