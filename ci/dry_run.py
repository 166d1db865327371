"""Do locally what the CI workflow does, and show the summary it would show.

    python ci/dry_run.py                                # every test session
    python ci/dry_run.py --session tests-trio-tcp      # a subset (repeat, or globs)
    python ci/dry_run.py --session 'tests-trio-*' --no-venv -R
    python ci/dry_run.py --list                         # the legs, nothing run

The same steps as ``.github/workflows/ci.yml``, on this machine: list the
sessions with ``nox -l --json -t tests`` and check them against
``[tool.harness]``; run each selected one through ``ci/run_leg.py``
(``nox -s SESSION``), one after another; read every leg's reports back; and
write the Markdown the run's page would show to ``reports/ci-summary.md``,
with a table on the terminal. Exits 0 when every leg passed, 1 otherwise.

``--no-venv`` and ``-R`` are handed to nox to skip building virtualenvs;
anything after ``--`` goes to nox as well.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from collections.abc import Sequence
from pathlib import Path

from cli_support import fail, project_root, reports_dir, setup_logging
from collect_reports import print_table
from leg_reports import LegReport, read_leg, this_os
from nox_listing import (
    DEFAULT_TAG,
    NoxSession,
    check_drift,
    list_nox_sessions,
    matrix_cells,
    matrix_entries,
)
from run_leg import leg_folder, run_leg
from summary_markdown import render_overview

from harness.errors import HarnessError

SUMMARY_FILE = "ci-summary.md"


def select(sessions: Sequence[NoxSession], patterns: Sequence[str]) -> list[NoxSession]:
    """The *sessions* matching any of *patterns* (globs on id or name).

    No pattern selects all. Raises `HarnessError` for a pattern that matches
    nothing, listing the sessions there are.
    """
    if not patterns:
        return list(sessions)
    chosen = []
    for pattern in patterns:
        found = [
            s
            for s in sessions
            if fnmatch.fnmatchcase(s.session, pattern)
            or fnmatch.fnmatchcase(s.name, pattern)
        ]
        if not found:
            names = ", ".join(s.session for s in sessions) or "(none)"
            msg = f"--session {pattern!r} matches no test session; there are: {names}"
            raise HarnessError(msg)
        chosen += [s for s in found if s not in chosen]
    return chosen


def dry_run(
    project: Path,
    *,
    patterns: Sequence[str] = (),
    nox_args: Sequence[str] = (),
    tag: str = DEFAULT_TAG,
    drift_check: bool = True,
    os_name: str | None = None,
    exitfirst: bool = False,
) -> list[LegReport]:
    """Run the selected legs of *project* as CI would; return their reports.

    Raises `HarnessError` when the sessions cannot be listed, drifted from
    ``[tool.harness]``, or a pattern matches nothing; a failing leg is a
    result, not an error.
    """
    sessions = list_nox_sessions(project, tag=tag, nox_args=nox_args)
    if drift_check:
        # --no-venv drops the Python axis from nox's ids: compare cells then.
        if "--no-venv" in nox_args:
            check_drift([s.session for s in sessions], matrix_cells(project))
        else:
            entries = matrix_entries(project)
            check_drift([s.session for s in sessions], [e["session"] for e in entries])
    chosen = select(sessions, patterns)

    reports = reports_dir(project)
    legs = []
    for index, session in enumerate(chosen, 1):
        print(
            f"\n=== leg {index}/{len(chosen)}: nox -s {session.session} "
            f"{' '.join(nox_args)}".rstrip(),
            flush=True,
        )
        run_leg(
            session.session,
            project=project,
            reports=reports,
            os_name=os_name or this_os(),
            python=session.python,
            nox_args=nox_args,
        )
        leg = read_leg(session.session, [leg_folder(reports, session.session)])
        legs.append(leg)
        if exitfirst and not leg.ok:
            break
    return legs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python ci/dry_run.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-s",
        "--session",
        dest="patterns",
        action="append",
        default=[],
        metavar="NAME",
        help="run only this session (a glob such as 'tests-trio-*'; repeatable)",
    )
    parser.add_argument(
        "--no-venv",
        action="store_true",
        help="run the sessions in this Python, without virtualenvs (nox --no-venv)",
    )
    parser.add_argument(
        "-R",
        "--reuse",
        action="store_true",
        help="reuse the virtualenvs of an earlier run, skip installs (nox -R)",
    )
    parser.add_argument(
        "--list", action="store_true", help="list the legs that would run, run none"
    )
    parser.add_argument(
        "-x", "--exitfirst", action="store_true", help="stop after the first bad leg"
    )
    parser.add_argument(
        "--summary",
        type=Path,
        help=f"where to write the Markdown (default: <reports-dir>/{SUMMARY_FILE})",
    )
    parser.add_argument("--project", type=Path, help="the project folder (default: .)")
    parser.add_argument(
        "--tag", default=DEFAULT_TAG, help=f"nox tag of the sessions ({DEFAULT_TAG})"
    )
    parser.add_argument(
        "--no-drift-check",
        dest="drift_check",
        action="store_false",
        help="do not compare nox's sessions with [tool.harness]",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("nox_args", nargs="*", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    nox_args = [
        *(["--no-venv"] if args.no_venv else []),
        *(["-R"] if args.reuse else []),
        *args.nox_args,
    ]
    try:
        project = project_root(args.project)
        if args.list:
            sessions = list_nox_sessions(project, tag=args.tag, nox_args=nox_args)
            for session in select(sessions, args.patterns):
                print(session.session)
            return 0
        legs = dry_run(
            project,
            patterns=args.patterns,
            nox_args=nox_args,
            tag=args.tag,
            drift_check=args.drift_check,
            exitfirst=args.exitfirst,
        )
        summary = args.summary or reports_dir(project) / SUMMARY_FILE
    except HarnessError as exc:
        return fail("dry_run", exc)

    markdown = render_overview(legs, base=project, details=True, title="Dry run")
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(markdown, encoding="utf-8")
    print()
    print_table(legs, title="Dry run")
    print(f"\nSummary (as the run's page would show it): {summary.resolve()}")
    bad = [leg for leg in legs if not leg.ok]
    if bad:
        print(
            f"Next: look at {leg_folder(reports_dir(project), bad[0].session)}/ "
            f"or rerun one leg: python ci/dry_run.py --session {bad[0].session}"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
