"""What happens to a session that leaked: the ``fail``, ``warn`` and ``reap`` modes.

`settle_leaks` is what the runner calls once the session's command has
exited: it checks for leaks, acts according to the mode, writes the JSON
report, prints the human summary, and returns the exit status the session
ends with.

=========  ================================================================
``fail``   Report; keep the evidence. A command that passed ends with
           `exit_codes.LEAKED` (86) when anything leaked; a failing command
           keeps its own status. The default when ``$CI`` is true.
``warn``   Report; keep the evidence; the command's status stands. The
           default elsewhere.
``reap``   Reap, report what was reaped and what survived. The command's
           status stands unless something survived and the command passed
           (then 86).
=========  ================================================================

*Keeping the evidence* means the bindspace and the session record stay, the
record marked closed (``closed_at``, so its state reads ``leaked``) for
``harness check`` and ``harness reap`` to act on later.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Final, Literal, get_args

import msgspec

from harness import exit_codes
from harness.errors import HarnessError
from harness.leak_report import make_console, render_reap, render_report, write_report
from harness.leaks import LeakReport, check_leaks
from harness.reap import DEFAULT_GRACE, ReapResult, reap_session
from harness.records import SessionRecord, SessionStore

log = logging.getLogger("harness.leak_modes")

LeakMode = Literal["fail", "warn", "reap"]

MODES: Final[tuple[str, ...]] = get_args(LeakMode)

_FALSE: Final = {"", "0", "false", "no", "off"}


def default_mode(env: Mapping[str, str] | None = None) -> LeakMode:
    """``fail`` when ``$CI`` is set to a true value (as CI services do), else
    ``warn``."""
    value = (os.environ if env is None else env).get("CI", "")
    return "warn" if value.strip().lower() in _FALSE else "fail"


def parse_mode(text: str) -> LeakMode:
    """*text* as a `LeakMode`; `HarnessError` naming the choices otherwise."""
    mode = text.strip().lower()
    if mode not in MODES:
        msg = f"unknown leak mode {text!r}; choose one of {', '.join(MODES)}"
        raise HarnessError(msg)
    return mode  # type: ignore[return-value]


class Settlement(msgspec.Struct, kw_only=True):
    """The outcome of `settle_leaks`, and the content of the JSON report."""

    session: str
    mode: str
    command_status: int
    exit_status: int
    """The status the session should exit with."""
    keep_evidence: bool
    """True: the bindspace and the record must stay, as evidence."""
    leak_count: int
    """What is still left: the check's count, or after ``reap`` what
    survived it. `harness.session.Session.close` accepts the settlement as
    its ``leaks`` and keeps the evidence exactly when this is not 0."""
    report: LeakReport
    """The leak check, before any reaping."""
    reap: ReapResult | None = None
    report_path: str | None = None


def settle_leaks(
    record: SessionRecord,
    mode: LeakMode,
    report_path: str | os.PathLike[str] | None = None,
    *,
    command_status: int = exit_codes.OK,
    exclude_pids: Iterable[int] = (),
    grace: float = DEFAULT_GRACE,
    stream: IO[str] | None = None,
    write_record: bool = False,
) -> Settlement:
    """Check *record*'s session for leaks after its command, and act on *mode*.

    Call it from the session's owner once the command has exited, with the
    command's exit status as *command_status* and the pids of the runner's
    own helper processes as *exclude_pids* (the calling process and its
    ancestors are excluded anyway). It prints a summary on *stream* (default
    stderr) and writes the `Settlement` as JSON to *report_path* if given.

    The record is left to the caller: a `Session` closed with
    ``close(leaks=settlement, exit_status=settlement.exit_status)`` keeps or
    removes its bindspace and record by ``leak_count``. Without a `Session`,
    pass ``write_record=True`` and, when the evidence is kept, the record is
    rewritten here with ``closed_at``, ``exit_status``, ``leak_count`` and
    ``report_path``.

    Returns the `Settlement`: ``exit_status`` is the status to exit with, and
    ``keep_evidence`` tells the runner not to remove the bindspace and the
    record. Raises `HarnessError` only when the report cannot be written.
    """
    exclude = tuple(exclude_pids)
    report = check_leaks(record, exclude_pids=exclude)
    reaped: ReapResult | None = None
    exit_status = command_status
    passed = command_status == exit_codes.OK

    # Decide the status and what stays on disk, per mode.
    if mode == "reap" and report.leaked:
        reaped = reap_session(
            record, grace=grace, exclude_pids=exclude, remove_when_clean=False
        )
        left = reaped.after.leak_count
    else:
        left = report.leak_count
    keep = left > 0
    if keep and passed and mode in ("fail", "reap"):
        exit_status = exit_codes.LEAKED

    path = str(Path(report_path).absolute()) if report_path is not None else None
    settlement = Settlement(
        session=record.id,
        mode=mode,
        command_status=command_status,
        exit_status=exit_status,
        keep_evidence=keep,
        leak_count=left,
        report=report,
        reap=reaped,
        report_path=path,
    )
    if path is not None:
        write_report(path, settlement)

    # The record marks the session closed but leaked, for `harness check`.
    if keep and write_record:
        closed = msgspec.structs.replace(
            record,
            closed_at=time.time(),
            exit_status=exit_status,
            leak_count=left,
            report_path=path,
        )
        SessionStore(Path(record.runtime_dir)).write(closed)

    _summarize(settlement, stream if stream is not None else sys.stderr)
    return settlement


def _summarize(settlement: Settlement, stream: IO[str]) -> None:
    report = settlement.report
    if not report.leaked and settlement.reap is None:
        log.info("Session %s left nothing behind.", settlement.session)
        return
    # Only now: rendering needs rich, which a clean session never pays for.
    console = make_console(stream)
    if settlement.reap is not None:
        render_reap(settlement.reap, console)
    else:
        render_report(report, console)
    if settlement.report_path:
        console.print(f"JSON report: {settlement.report_path}")
    if settlement.exit_status != settlement.command_status:
        console.print(
            f"[bold red]The session fails with status {settlement.exit_status} "
            f"(leak mode {settlement.mode!r}) although the command passed.[/bold red]"
        )
