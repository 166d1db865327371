"""List the CI legs: nox's test sessions x operating systems, as a job matrix.

    python ci/matrix_output.py --os ubuntu-latest --os macos-latest
    python ci/matrix_output.py --os ubuntu-latest --json

The sessions are what ``nox -l --json -t tests`` lists in the project, checked
against ``[tool.harness]`` (`harness.matrix`): if the two disagree the step
fails and names the difference, so CI never runs a matrix that has drifted
from the nox sessions. Each session is crossed with every ``--os``.

In GitHub Actions the matrix goes to the step's outputs (``matrix``: the
``{"include": [...]}`` JSON for ``strategy.matrix``; ``count``: the number of
legs) and a short table to the step summary; elsewhere a table is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from cli_support import fail, project_root, set_output, setup_logging, write_summary
from nox_listing import (
    DEFAULT_TAG,
    Leg,
    build_legs,
    check_drift,
    github_matrix,
    list_nox_sessions,
    matrix_entries,
)

from harness.errors import HarnessError

#: The Python a leg sets up when its session is not pinned to a version.
DEFAULT_PYTHON = "3.13"


def compute_legs(
    project: Path,
    *,
    oses: Sequence[str],
    tag: str = DEFAULT_TAG,
    default_python: str = DEFAULT_PYTHON,
    drift_check: bool = True,
) -> list[Leg]:
    """The legs of *project*: its nox sessions tagged *tag*, once per os.

    Raises `HarnessError` when nox fails, lists nothing, or (with
    *drift_check*) lists other sessions than ``[tool.harness]`` defines.
    """
    sessions = list_nox_sessions(project, tag=tag)
    entries = matrix_entries(project)
    if drift_check:
        check_drift([s.session for s in sessions], [e["session"] for e in entries])
    return build_legs(sessions, entries, oses=oses, default_python=default_python)


def summary_markdown(legs: Sequence[Leg]) -> str:
    """The matrix job's step summary: which legs will run."""
    oses = list(dict.fromkeys(leg.os for leg in legs))
    sessions = list(dict.fromkeys(leg.session for leg in legs))
    lines = [
        f"### Matrix: {len(sessions)} sessions x {len(oses)} operating systems "
        f"= {len(legs)} legs",
        "",
        "| session | backend | transport | python | " + " | ".join(oses) + " |",
        "| --- | --- | --- | --- | " + " | ".join(":-:" for _ in oses) + " |",
    ]
    for session in sessions:
        own = [leg for leg in legs if leg.session == session]
        first = own[0]
        marks = ["yes" if any(leg.os == o for leg in own) else "-" for o in oses]
        lines.append(
            f"| `{session}` | {first.backend or '?'} | {first.transport or '?'} "
            f"| {first.python} | " + " | ".join(marks) + " |"
        )
    return "\n".join(lines) + "\n"


def print_table(legs: Sequence[Leg]) -> None:
    """The legs as an aligned table on stdout."""
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=False, highlight=False)
    if not console.is_terminal:
        console.width = 160
    table = Table(box=None, pad_edge=False, title_justify="left")
    table.title = f"{len(legs)} legs"
    for column in ("job", "nox -s", "backend", "transport", "python", "artifact"):
        table.add_column(column, no_wrap=True)
    for leg in legs:
        table.add_row(
            leg.title,
            leg.session,
            leg.backend or "?",
            leg.transport or "?",
            leg.python,
            leg.artifact,
        )
    console.print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python ci/matrix_output.py",
        description=(__doc__ or "").split("\n\n", 1)[0],
        epilog="In GitHub Actions: writes the outputs `matrix` and `count` to "
        "$GITHUB_OUTPUT and a table to $GITHUB_STEP_SUMMARY.",
    )
    parser.add_argument(
        "--os",
        dest="oses",
        action="append",
        metavar="RUNNER",
        required=True,
        help="a runner label to run every session on (repeat: --os ubuntu-latest "
        "--os macos-latest)",
    )
    parser.add_argument(
        "--default-python",
        default=DEFAULT_PYTHON,
        metavar="X.Y",
        help="Python for sessions that nox does not pin to a version "
        f"(default: {DEFAULT_PYTHON})",
    )
    parser.add_argument(
        "--tag", default=DEFAULT_TAG, help=f"nox tag of the sessions ({DEFAULT_TAG})"
    )
    parser.add_argument("--project", type=Path, help="the project folder (default: .)")
    parser.add_argument(
        "--no-drift-check",
        dest="drift_check",
        action="store_false",
        help="do not compare nox's sessions with [tool.harness] (not for CI)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print only the matrix JSON on stdout"
    )
    parser.add_argument("-v", "--verbose", action="count", default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        project = project_root(args.project)
        legs = compute_legs(
            project,
            oses=args.oses,
            tag=args.tag,
            default_python=args.default_python,
            drift_check=args.drift_check,
        )
    except HarnessError as exc:
        return fail("matrix_output", exc)

    matrix = json.dumps(github_matrix(legs), separators=(",", ":"))
    if args.json:
        print(matrix)
        return 0
    set_output("matrix", matrix)
    set_output("count", str(len(legs)))
    write_summary(summary_markdown(legs))
    print_table(legs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
