"""Counts and failures from a JUnit XML file, as pytest ``--junitxml`` writes it.

Each ``<testcase>`` is counted by what it holds (``<failure>``, ``<error>``,
``<skipped>``, or nothing: passed) rather than by the totals on
``<testsuite>``, which some writers leave out or get wrong. A file that cannot
be read or parsed is not an exception: it comes back with ``problem`` set, so
a summary can say so next to the legs that did write their reports.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

log = logging.getLogger("harness.ci.junit_counts")

#: Longest failure message kept; the full text is in the uploaded XML.
MESSAGE_LIMIT: Final = 160


@dataclass(frozen=True)
class FailedTest:
    """One test that failed or errored."""

    test_id: str
    """``<classname>::<name>``, e.g. ``tests.test_spawn::test_cancel[tcp]``."""
    kind: str
    """``failure`` (an assertion or exception in the test) or ``error``
    (in a fixture, or a collection error)."""
    message: str
    """The first line of the failure message, shortened."""


@dataclass(frozen=True)
class JUnitCounts:
    """What one JUnit XML file says about a test run."""

    path: Path
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    seconds: float = 0.0
    """The run's own timing: the sum of the ``<testsuite time>`` values."""
    failures: tuple[FailedTest, ...] = field(default=())
    problem: str | None = None
    """Why the file could not be read; counts are zero when set."""

    @property
    def total(self) -> int:
        """All test cases in the file."""
        return self.passed + self.failed + self.errors + self.skipped

    @property
    def ok(self) -> bool:
        """No failure, no error, and the file was readable."""
        return self.problem is None and self.failed == 0 and self.errors == 0


def _first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line := line.strip():
            if len(line) > MESSAGE_LIMIT:
                return line[: MESSAGE_LIMIT - 3] + "..."
            return line
    return ""


def _float(text: str | None) -> float:
    try:
        return float(text or 0)
    except ValueError:
        return 0.0


def read_junit(path: Path) -> JUnitCounts:
    """Count the test cases of the JUnit XML file at *path*.

    Never raises for a bad file: the result's ``problem`` says what is wrong
    with it (missing, empty, not XML, not JUnit).
    """
    try:
        root = ET.parse(path).getroot()
    except OSError as exc:
        return JUnitCounts(path=path, problem=f"cannot be read: {exc.strerror}")
    except ET.ParseError as exc:
        # An interrupted run leaves a truncated file: say so plainly.
        return JUnitCounts(path=path, problem=f"is not well-formed XML ({exc})")
    if root.tag not in ("testsuites", "testsuite"):
        return JUnitCounts(
            path=path, problem=f"is not JUnit XML (root element <{root.tag}>)"
        )

    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    passed = failed = errors = skipped = 0
    failures: list[FailedTest] = []
    for case in root.iter("testcase"):
        classname = case.get("classname") or ""
        name = case.get("name") or "?"
        test_id = f"{classname}::{name}" if classname else name
        failure = case.find("failure")
        error = case.find("error")
        if failure is not None or error is not None:
            element = failure if failure is not None else error
            assert element is not None
            kind = "failure" if failure is not None else "error"
            message = _first_line(element.get("message")) or _first_line(element.text)
            failures.append(FailedTest(test_id=test_id, kind=kind, message=message))
            if kind == "failure":
                failed += 1
            else:
                errors += 1
        elif case.find("skipped") is not None:
            skipped += 1
        else:
            passed += 1
    seconds = sum(_float(suite.get("time")) for suite in suites)
    log.debug(
        "Read %s: %d passed, %d failed, %d errors, %d skipped.",
        path,
        passed,
        failed,
        errors,
        skipped,
    )
    return JUnitCounts(
        path=path,
        passed=passed,
        failed=failed,
        errors=errors,
        skipped=skipped,
        seconds=seconds,
        failures=tuple(failures),
    )
