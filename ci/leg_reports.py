"""One leg's results, read back from its report folder.

A leg's folder is ``<reports-dir>/<session>/``. The nox session writes its
JUnit XML, its leak report (JSON) and, after a hang, its hang report
(``hang*.txt``) somewhere below it; ``ci/run_leg.py`` adds ``leg.json``: the
command, its exit status, when it started and how long it took. `read_leg`
gathers all of it into a `LegReport`, which knows the leg's verdict.

Files older than the leg's start are not counted: a dry run on a developer's
machine reuses the same folders, and a report left by yesterday's run must
not pass for today's. The nox sessions write each run into a folder of its
own, ``<session>/<run-id>/`` (``YYYYMMDD-HHMMSS-<pid>``); only the newest
run folder counts, even when an earlier run finished within the same
seconds. Files that do not count are listed as ``stale``, never deleted.
"""

from __future__ import annotations

import json
import logging
import platform
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from junit_counts import JUnitCounts, read_junit
from leak_summary import LeakFile, read_leak_file

log = logging.getLogger("harness.ci.leg_reports")

#: The file ``ci/run_leg.py`` writes into a leg's folder.
LEG_FILE: Final = "leg.json"
#: nox's own ``--report`` of the leg, kept beside it.
NOX_REPORT_FILE: Final = "nox-report.json"
#: nox's output during the leg, for a summary of a leg that wrote no report.
NOX_LOG_FILE: Final = "nox.log"

#: A report this many seconds older than the leg's start still counts: file
#: systems round modification times (1 s on some macOS volumes, 2 s on FAT).
MTIME_SLACK: Final = 2.0

#: The name of a run folder, as `harness.nox_sessions` makes them.
RUN_FOLDER: Final = re.compile(r"\d{8}-\d{6}-\d+")

Verdict = Literal["passed", "leaked", "failed", "hung", "skipped", "not run"]

#: Worst first: the verdict of a leg is the first that applies.
VERDICT_ORDER: Final[tuple[Verdict, ...]] = (
    "hung",
    "failed",
    "skipped",
    "not run",
    "leaked",
    "passed",
)


@dataclass(frozen=True)
class LegRecord:
    """What ``ci/run_leg.py`` saw of one leg: ``leg.json``."""

    session: str
    name: str = ""
    os: str = ""
    python: str = ""
    command: tuple[str, ...] = ()
    exit_status: int | None = None
    """nox's exit status; ``None`` while it runs or if it never started."""
    nox_result: str | None = None
    """nox's verdict on the session: ``success``, ``failed``, ``skipped``."""
    nox_reason: str | None = None
    started_at: float = 0.0
    """Unix time the leg started."""
    duration: float | None = None
    """Wall-clock seconds from start to end of nox."""

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON object."""
        return {
            "session": self.session,
            "name": self.name,
            "os": self.os,
            "python": self.python,
            "command": list(self.command),
            "exit_status": self.exit_status,
            "nox_result": self.nox_result,
            "nox_reason": self.nox_reason,
            "started_at": self.started_at,
            "duration": self.duration,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LegRecord:
        """The record from a decoded ``leg.json``; unknown keys are ignored."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["command"] = tuple(known.get("command") or ())
        return cls(**known)


def this_os() -> str:
    """The machine this runs on, as a local summary names it: ``local Linux``."""
    return f"local {platform.system()}"


@dataclass(frozen=True)
class LegReport:
    """Everything one leg left in its folder, and the leg's verdict."""

    session: str
    folder: Path
    record: LegRecord | None = None
    junit: tuple[JUnitCounts, ...] = ()
    leaks: tuple[LeakFile, ...] = ()
    hangs: tuple[Path, ...] = ()
    stale: tuple[Path, ...] = ()
    """Report files older than the leg's start: shown, not counted."""
    problems: tuple[str, ...] = field(default=())

    # -------------------------------------------------------------- counts

    @property
    def passed(self) -> int:
        return sum(j.passed for j in self.junit)

    @property
    def failed(self) -> int:
        return sum(j.failed for j in self.junit)

    @property
    def errors(self) -> int:
        return sum(j.errors for j in self.junit)

    @property
    def skipped(self) -> int:
        return sum(j.skipped for j in self.junit)

    @property
    def leak_count(self) -> int:
        return sum(len(f.rows) for f in self.leaks)

    @property
    def duration(self) -> float | None:
        """The leg's wall-clock time, else the tests' own timing, else None."""
        if self.record is not None and self.record.duration is not None:
            return self.record.duration
        if self.junit:
            return sum(j.seconds for j in self.junit)
        return None

    # ------------------------------------------------------------- verdict

    @property
    def verdict(self) -> Verdict:
        """One word for the leg, the worst that applies (`VERDICT_ORDER`)."""
        record = self.record
        if self.hangs:
            return "hung"
        if record is not None and record.nox_result == "skipped":
            return "skipped"
        failed_status = record is not None and record.exit_status not in (0, None)
        if (
            failed_status
            or self.failed
            or self.errors
            or any(j.problem for j in self.junit)
            or any(f.problem for f in self.leaks)
        ):
            return "failed"
        if record is None and not self.junit:
            return "not run"
        if record is not None and record.exit_status is None:
            # Started but never finished: cancelled, or the runner died.
            return "failed"
        if self.leak_count:
            return "leaked"
        return "passed"

    @property
    def ok(self) -> bool:
        """Whether the leg counts as green."""
        return self.verdict == "passed"


def _load_record(path: Path) -> tuple[LegRecord | None, str | None]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return LegRecord.from_json(data), None
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, TypeError) as exc:
        return None, f"{path} cannot be read: {exc}"


def read_leg(session: str, folders: Iterable[Path]) -> LegReport:
    """Gather the reports of leg *session* from *folders* (searched deeply).

    ``leg.json`` is taken from the first folder that has one. Raises nothing
    for bad files: each is reported in the result.
    """
    folders = [f for f in dict.fromkeys(folders)]
    record: LegRecord | None = None
    problems: list[str] = []
    for folder in folders:
        record, problem = _load_record(folder / LEG_FILE)
        if problem:
            problems.append(problem)
        if record is not None:
            break
    started = record.started_at if record is not None else 0.0

    junit: list[JUnitCounts] = []
    leaks: list[LeakFile] = []
    hangs: list[Path] = []
    stale: list[Path] = []
    for folder in folders:
        if not folder.is_dir():
            continue
        newest = _newest_run_folder(folder)
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or path.name in (LEG_FILE, NOX_REPORT_FILE):
                continue
            is_report = path.suffix in (".xml", ".json") or _is_hang_dump(path)
            if not is_report:
                continue
            run = _run_folder(folder, path)
            older_run = newest is not None and run is not None and run != newest
            if older_run or (started and path.stat().st_mtime < started - MTIME_SLACK):
                stale.append(path)
                continue
            if path.suffix == ".xml":
                junit.append(read_junit(path))
            elif path.suffix == ".json":
                leak_file = read_leak_file(path)
                if leak_file is not None and (
                    leak_file.problem is None or "leak" in path.name
                ):
                    leaks.append(leak_file)
            else:
                hangs.append(path)
    return LegReport(
        session=session,
        folder=folders[0] if folders else Path(),
        record=record,
        junit=tuple(junit),
        leaks=tuple(leaks),
        hangs=tuple(hangs),
        stale=tuple(stale),
        problems=tuple(problems),
    )


def _run_folder(folder: Path, path: Path) -> str | None:
    """The run folder *path* lies in below *folder*, if any."""
    for part in path.relative_to(folder).parts[:-1]:
        if RUN_FOLDER.fullmatch(part):
            return part
    return None


def _newest_run_folder(folder: Path) -> str | None:
    """The name of the newest run folder anywhere below *folder*."""
    runs = [p for p in folder.rglob("*") if p.is_dir() and RUN_FOLDER.fullmatch(p.name)]
    if not runs:
        return None

    def key(path: Path) -> tuple[str, float]:
        stamp = path.name.rsplit("-", 1)[0]
        return stamp, path.stat().st_mtime

    return max(runs, key=key).name


def _is_hang_dump(path: Path) -> bool:
    return path.suffix == ".txt" and path.name.startswith("hang")


def find_legs(root: Path) -> list[LegReport]:
    """Every leg under *root*: each folder holding a ``leg.json``, sorted.

    *root* may be a reports folder (``reports/``) or a folder of downloaded
    artifacts (``artifacts/reports-<session>-<os>/<session>/leg.json``).
    """
    legs = []
    for leg_file in sorted(root.rglob(LEG_FILE)):
        record, _ = _load_record(leg_file)
        session = record.session if record is not None else leg_file.parent.name
        legs.append(read_leg(session, [leg_file.parent]))
    return legs
