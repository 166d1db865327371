"""The Markdown a CI run shows: one section per leg, one table for the run.

GitHub renders the text appended to ``$GITHUB_STEP_SUMMARY`` on the run's
page, so a failed leg is read there first: the section starts with the
verdict, then the test counts, the failed tests, what leaked and where, any
hang report, and the command that reproduces the leg locally. Lists are cut
at a limit (GitHub refuses a step summary over 1 MiB); the complete reports
are in the leg's uploaded artifact.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from leg_reports import NOX_LOG_FILE, VERDICT_ORDER, LegReport, Verdict

#: Rows shown per table before "... and N more".
ROW_LIMIT: Final = 25
#: Lines of a hang report shown inline.
HANG_LINES: Final = 60
#: Lines of nox's output quoted for a leg that failed without a test report.
LOG_LINES: Final = 25

ICONS: Final[dict[Verdict, str]] = {
    "passed": "✅",
    "leaked": "⚠️",
    "failed": "❌",
    "hung": "⏱️",
    "skipped": "⏭️",
    "not run": "⛔",
}


def cell(text: object) -> str:
    """*text* made safe for one cell of a Markdown table."""
    value = str(text).replace("\r", " ").replace("\n", " ")
    value = value.replace("\\", "\\\\").replace("|", "\\|")
    return value.replace("<", "&lt;").replace(">", "&gt;")


def code(text: object) -> str:
    """*text* as inline code that survives backticks inside it."""
    value = str(text).replace("\n", " ")
    longest = max((len(run) for run in re.findall(r"`+", value)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if value.startswith("`") or value.endswith("`") else ""
    return f"{fence}{pad}{value}{pad}{fence}"


def duration(seconds: float | None) -> str:
    """``12.3 s``, ``4 min 05 s``, ``1 h 02 min``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _display(path: Path, base: Path | None) -> str:
    if base is not None:
        try:
            return str(path.resolve().relative_to(base.resolve()))
        except ValueError:
            pass
    return str(path)


def leg_title(leg: LegReport) -> str:
    """``tests-trio-tcp (ubuntu-latest)``: the session and where it ran."""
    record = leg.record
    if record is not None and record.os:
        return f"{leg.session} ({record.os})"
    return leg.session


def render_leg(
    leg: LegReport,
    *,
    base: Path | None = None,
    artifact: str | None = None,
    heading: str = "###",
) -> str:
    """The Markdown section of one leg.

    Paths are shown relative to *base* (the project) when they lie inside
    it. *artifact* names the uploaded artifact in the "next step" line.
    """
    verdict = leg.verdict
    record = leg.record
    out: list[str] = [f"{heading} {ICONS[verdict]} {leg_title(leg)}: {verdict}", ""]

    facts = []
    if record is not None and record.python:
        facts.append(f"Python {record.python}")
    facts.append(f"took {duration(leg.duration)}")
    if record is not None and record.command:
        command = code(" ".join(record.command))
        if record.exit_status is None:
            facts.append(f"{command} did not finish")
        else:
            facts.append(f"{command} exited with status {record.exit_status}")
        if record.nox_result and record.nox_result != "success":
            reason = f" ({record.nox_reason})" if record.nox_reason else ""
            facts.append(f"nox says {record.nox_result}{reason}")
    elif record is None:
        facts.append(
            f"no {code('leg.json')}: the leg did not run through ci/run_leg.py"
        )
    out += [" · ".join(facts), ""]

    # The counts, always: a leg without a JUnit file says so.
    if leg.junit:
        out += [
            "| tests | passed | failed | errors | skipped | leaks |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| {leg.passed + leg.failed + leg.errors + leg.skipped} | {leg.passed} "
            f"| {leg.failed} | {leg.errors} | {leg.skipped} | {leg.leak_count} |",
            "",
        ]
    else:
        out += [
            "No JUnit XML was written: the tests did not run or did not finish.",
            "",
        ]
    for junit in leg.junit:
        if junit.problem:
            out += [f"- {code(_display(junit.path, base))} {cell(junit.problem)}"]
    for leak_file in leg.leaks:
        if leak_file.problem:
            out += [
                f"- {code(_display(leak_file.path, base))} {cell(leak_file.problem)}"
            ]
    for problem in leg.problems:
        out += [f"- {cell(problem)}"]

    failures = [f for j in leg.junit for f in j.failures]
    if failures:
        out += ["", f"{heading}# Failed tests ({len(failures)})", ""]
        out += ["| test | kind | message |", "| --- | --- | --- |"]
        for failure in failures[:ROW_LIMIT]:
            message = cell(failure.message)
            out.append(f"| {code(failure.test_id)} | {failure.kind} | {message} |")
        if len(failures) > ROW_LIMIT:
            out.append(f"| ... and {len(failures) - ROW_LIMIT} more | | |")

    rows = [(f, row) for f in leg.leaks for row in f.rows]
    if rows:
        out += ["", f"{heading}# Leaks ({len(rows)})", ""]
        for leak_file in leg.leaks:
            for leaks in leak_file.sessions:
                if not leaks.rows:
                    continue
                where = [f"report {code(_display(leak_file.path, base))}"]
                if leaks.session:
                    where.append(f"session {code(leaks.session)}")
                if leaks.bindspace:
                    where.append(f"bindspace {code(leaks.bindspace)}")
                if leaks.port is not None:
                    where.append(f"port {leaks.port}")
                out += ["- " + " · ".join(where)]
        out.append("")
        out += ["| kind | what | where | found by |", "| --- | --- | --- | --- |"]
        for _, row in rows[:ROW_LIMIT]:
            out.append(
                f"| {row.kind} | {cell(row.what)} | {code(row.where)} "
                f"| {cell(row.found_by)} |"
            )
        if len(rows) > ROW_LIMIT:
            out.append(f"| ... and {len(rows) - ROW_LIMIT} more | | | |")

    if verdict != "passed" and not failures and not rows and not leg.hangs:
        # Nothing else explains the failure: quote the end of nox's output.
        out += _log_tail(leg.folder / NOX_LOG_FILE, base)

    for hang in leg.hangs:
        out += ["", f"{heading}# Hang report {code(_display(hang, base))}", ""]
        out += _hang_excerpt(hang)

    if leg.stale:
        shown = ", ".join(code(_display(p, base)) for p in leg.stale[:5])
        more = f" and {len(leg.stale) - 5} more" if len(leg.stale) > 5 else ""
        out += [
            "",
            f"Not counted, older than this leg (from an earlier run): {shown}{more}.",
        ]

    if verdict != "passed":
        steps = []
        if artifact:
            steps.append(f"download the artifact {code(artifact)}")
        steps.append(
            f"reproduce: {code(f'python ci/dry_run.py --session {leg.session}')}"
        )
        out += ["", "**Next:** " + "; ".join(steps) + "."]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).rstrip() + "\n"


def _fenced(text: str) -> list[str]:
    longest = max((len(run) for run in re.findall(r"`{3,}", text)), default=2)
    fence = "`" * (longest + 1)
    return [f"{fence}text", text, fence]


def _log_tail(path: Path, base: Path | None) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    # Colour codes make the text unreadable outside a terminal.
    tail = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in lines[-LOG_LINES:]]
    return [
        "",
        f"The last {len(tail)} lines of nox's output ({code(_display(path, base))}):",
        "",
        *_fenced("\n".join(tail)),
    ]


def _hang_excerpt(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        return [f"(cannot be read: {cell(exc.strerror)})"]
    shown = lines[:HANG_LINES]
    text = "\n".join(shown)
    longest = max((len(run) for run in re.findall(r"`{3,}", text)), default=2)
    fence = "`" * (longest + 1)
    more = f", first {HANG_LINES} of {len(lines)}" if len(lines) > HANG_LINES else ""
    return [
        f"<details><summary>stacks at the hang ({len(shown)} lines{more})</summary>",
        "",
        f"{fence}text",
        text,
        fence,
        "",
        "</details>",
    ]


def headline(legs: Sequence[LegReport]) -> str:
    """``6 legs: 4 passed, 1 failed, 1 leaked`` (worst verdicts first)."""
    counts = {v: sum(1 for leg in legs if leg.verdict == v) for v in VERDICT_ORDER}
    parts = [f"{n} {v}" for v, n in counts.items() if n]
    noun = "leg" if len(legs) == 1 else "legs"
    return f"{len(legs)} {noun}: " + (", ".join(parts) if parts else "none ran")


def render_overview(
    legs: Sequence[LegReport],
    *,
    base: Path | None = None,
    details: bool | None = None,
    title: str = "Test sessions",
) -> str:
    """One table for every leg, then the sections of the legs that need one.

    *details*: ``True`` adds every leg's section, ``False`` none, ``None``
    (the default) only those of legs that did not pass.
    """
    ok = all(leg.ok for leg in legs) and bool(legs)
    out = [f"## {'✅' if ok else '❌'} {title}: {headline(legs)}", ""]
    if legs:
        out += [
            "| leg | verdict | passed | failed | errors | skipped | leaks | duration |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for leg in sorted(legs, key=lambda g: VERDICT_ORDER.index(g.verdict)):
            tests = bool(leg.junit)
            out.append(
                f"| {cell(leg_title(leg))} | {ICONS[leg.verdict]} {leg.verdict} "
                f"| {leg.passed if tests else '-'} | {leg.failed if tests else '-'} "
                f"| {leg.errors if tests else '-'} | {leg.skipped if tests else '-'} "
                f"| {leg.leak_count} | {duration(leg.duration)} |"
            )
    else:
        out.append("No leg left a report: see the jobs' logs.")
    for leg in sorted(legs, key=lambda g: VERDICT_ORDER.index(g.verdict)):
        if details or (details is None and not leg.ok):
            out += ["", render_leg(leg, base=base, heading="###").rstrip()]
    return "\n".join(out).rstrip() + "\n"
