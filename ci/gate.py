"""The one required status of a CI run: fail unless every job it needs passed.

    NEEDS='${{ toJSON(needs) }}' python3 ci/gate.py

GitHub Actions hands a job the results of the jobs it ``needs`` as JSON
(``{"tests": {"result": "failure", "outputs": {}}, ...}``). A matrix job's
result is ``failure`` when any of its legs failed, ``cancelled`` when the run
was cancelled, and ``skipped`` when a job before it failed; only
``success`` passes. Branch protection then requires this one job instead of
every leg by name, so adding a session or an operating system needs no
change to the repository's settings.

Standard library only, so the gate also runs when installing the project is
what broke.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

PASSING = frozenset({"success"})


def job_results(needs: Mapping[str, Any]) -> dict[str, str]:
    """``{job: result}`` from the decoded ``needs`` context."""
    results = {}
    for job, facts in needs.items():
        result = facts.get("result") if isinstance(facts, Mapping) else None
        results[str(job)] = str(result or "unknown")
    return results


def verdict(results: Mapping[str, str]) -> tuple[bool, str]:
    """Whether the run passes, and a table that says why, one job a line."""
    width = max((len(job) for job in results), default=3)
    lines = [f"{'job':<{width}}  result", f"{'-' * width}  ------"]
    for job, result in results.items():
        mark = "" if result in PASSING else "   <- not passing"
        lines.append(f"{job:<{width}}  {result}{mark}")
    ok = bool(results) and all(r in PASSING for r in results.values())
    return ok, "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 ci/gate.py", description=(__doc__ or "").split("\n\n", 1)[0]
    )
    parser.add_argument(
        "--needs",
        default=os.environ.get("NEEDS", ""),
        help="the needs context as JSON (default: $NEEDS)",
    )
    args = parser.parse_args(argv)
    try:
        needs = json.loads(args.needs)
    except json.JSONDecodeError as exc:
        print(
            f"ci/gate.py: error: the needs context is not JSON ({exc}): "
            f"{args.needs[:120]!r}; set NEEDS: ${{{{ toJSON(needs) }}}} on the step",
            file=sys.stderr,
        )
        return 2
    if not isinstance(needs, dict) or not needs:
        print(
            "ci/gate.py: error: the needs context is empty; give the job "
            "`needs: [...]` listing every job that must pass",
            file=sys.stderr,
        )
        return 2
    ok, table = verdict(job_results(needs))
    print(table)
    if ok:
        print("\nEvery job passed.")
        return 0
    print(
        "\nNot every job passed: open the failed jobs above; each leg's summary "
        "(on the run's page) lists its failed tests and leaks.",
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
