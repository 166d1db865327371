"""Write one leg's Markdown summary: tests, failures, leaks, hang, duration.

    python ci/step_summary.py --session tests-trio-tcp --artifact reports-...

Reads the leg's folder ``<reports-dir>/<session>/`` (see ``ci/run_leg.py``)
and appends the section to ``$GITHUB_STEP_SUMMARY``, or to ``--output``, or
prints it. It exits 0 whatever the leg's verdict: the leg's status is the
run step's; this step only tells what happened, and runs after a failure too.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cli_support import fail, project_root, reports_dir, setup_logging, write_summary
from leg_reports import LegReport, read_leg
from summary_markdown import render_leg

from harness.errors import HarnessError


def leg_report(project: Path, reports: Path, session: str) -> LegReport:
    """The report of leg *session*, read from ``<reports>/<session>/``."""
    return read_leg(session, [reports / session])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python ci/step_summary.py",
        description=(__doc__ or "").split("\n\n", 1)[0],
    )
    parser.add_argument("--session", required=True, help="the leg's nox session")
    parser.add_argument("--artifact", help="the artifact the leg's reports go to")
    parser.add_argument("--project", type=Path, help="the project folder (default: .)")
    parser.add_argument(
        "--reports", type=Path, help="the reports folder ([tool.harness] reports-dir)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="append to this file (default: $GITHUB_STEP_SUMMARY, else print)",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        project = project_root(args.project)
        reports = args.reports or reports_dir(project)
    except HarnessError as exc:
        return fail("step_summary", exc)
    leg = leg_report(project, reports, args.session)
    markdown = render_leg(leg, base=project, artifact=args.artifact)
    if write_summary(markdown, path=args.output) is None:
        sys.stdout.write(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
