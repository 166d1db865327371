"""Run one leg: ``nox -s SESSION``, timed, with its outcome kept in ``leg.json``.

    python ci/run_leg.py --session tests-trio-tcp --os ubuntu-latest
    python ci/run_leg.py --session tests-trio-tcp -- --no-venv

Exits with nox's own status, so the CI step fails exactly when nox does. The
leg's folder ``<reports-dir>/<session>/`` gets ``leg.json`` (the command,
its exit status, the start time and the duration) and ``nox-report.json``
(nox's ``--report``) and ``nox.log`` (its output, also
shown live), beside the JUnit XML and leak report the session
writes there itself; ``ci/step_summary.py`` reads them all back.
``leg.json`` is written before nox starts as well, so a leg that the runner
kills half-way still reads as "did not finish" rather than as missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from cli_support import fail, project_root, reports_dir
from leg_reports import LEG_FILE, NOX_LOG_FILE, NOX_REPORT_FILE, LegRecord, this_os
from nox_listing import nox_command

from harness.errors import HarnessError

log = logging.getLogger("harness.ci.run_leg")


def leg_folder(reports: Path, session: str) -> Path:
    """The folder of leg *session* under the reports folder *reports*."""
    return reports / session


def write_record(folder: Path, record: LegRecord) -> Path:
    """Write *record* to ``<folder>/leg.json`` atomically; return the path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LEG_FILE
    tmp = path.with_name(f".{LEG_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record.to_json(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _nox_outcome(path: Path, session: str) -> tuple[str | None, str | None]:
    """nox's verdict on *session* from its ``--report`` file, if it wrote one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None
    for entry in data.get("sessions") or ():
        signatures = entry.get("signatures") or ()
        if session in signatures or entry.get("name") == session:
            return entry.get("result"), entry.get("reason")
    sessions = data.get("sessions") or ()
    if len(sessions) == 1:
        return sessions[0].get("result"), sessions[0].get("reason")
    return None, None


def tee(fd: int, path: Path, proc: subprocess.Popen[bytes]) -> None:
    """Copy everything from *fd* to stdout and to the file *path*.

    Stops at end of file, or soon after *proc* exits: a process it left
    behind may hold the pipe open for a long time, and the leg is over when
    nox is. The log is what the summary quotes when a leg fails before any
    test report exists (a broken install, a bad command line).
    """
    out = sys.stdout.buffer
    with open(path, "wb") as log_file:
        while True:
            readable, _, _ = select.select([fd], [], [], 0.2)
            if readable:
                chunk = os.read(fd, 65536)
                if not chunk:
                    return
                out.write(chunk)
                out.flush()
                log_file.write(chunk)
            elif proc.poll() is not None:
                return


def run_leg(
    session: str,
    *,
    project: Path,
    reports: Path,
    os_name: str | None = None,
    python: str | None = None,
    nox_args: Sequence[str] = (),
) -> LegRecord:
    """Run ``nox -s SESSION`` in *project* and record the leg in its folder.

    nox's output goes to this process's stdout and to ``nox.log``. SIGTERM
    and SIGINT received meanwhile are passed on to nox as SIGINT (and only to
    nox, the process started here), so a cancelled CI job still lets the
    session close and write its leak report. Returns the finished
    `LegRecord`.
    """
    folder = leg_folder(reports, session)
    nox_report = folder / NOX_REPORT_FILE
    command = [*nox_command(), "--session", session, *nox_args]
    shown = ["nox", "-s", session, *nox_args]
    record = LegRecord(
        session=session,
        name=session,
        os=os_name or this_os(),
        python=python or "{}.{}.{}".format(*sys.version_info[:3]),
        command=tuple(shown),
        started_at=time.time(),
    )
    write_record(folder, record)
    nox_report.unlink(missing_ok=True)

    log.info("Running %s in %s.", " ".join(shown), project)
    started = time.monotonic()
    proc = subprocess.Popen(
        [*command, "--report", str(nox_report)],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )

    def forward(signum: int, _frame: FrameType | None) -> None:
        # nox stops a session gracefully on SIGINT only (it interrupts the
        # command, waits, then terminates it); a SIGTERM would end nox at
        # once and orphan the session's processes. So both become SIGINT.
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)

    previous = {
        sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        assert proc.stdout is not None
        tee(proc.stdout.fileno(), folder / NOX_LOG_FILE, proc)
        status = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    result, reason = _nox_outcome(nox_report, session)
    finished = dataclasses.replace(
        record,
        exit_status=status,
        duration=time.monotonic() - started,
        nox_result=result,
        nox_reason=reason,
    )
    write_record(folder, finished)
    return finished


def exit_status(record: LegRecord) -> int:
    """The shell's view of nox's status: ``128 + N`` after signal N."""
    status = record.exit_status
    if status is None:
        return 1
    return 128 - status if status < 0 else status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python ci/run_leg.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Arguments after -- go to nox (e.g. -- --no-venv, -- -R).",
    )
    parser.add_argument("--session", required=True, help="the nox session to run")
    parser.add_argument(
        "--os", dest="os_name", help="the name the summary gives the machine"
    )
    parser.add_argument("--python", help="the Python version the leg was set up with")
    parser.add_argument(
        "--project", type=Path, default=None, help="the project folder (default: .)"
    )
    parser.add_argument(
        "--reports",
        type=Path,
        default=None,
        help="the reports folder (default: [tool.harness] reports-dir)",
    )
    parser.add_argument("nox_args", nargs="*", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        project = project_root(args.project)
        reports = args.reports or reports_dir(project)
        record = run_leg(
            args.session,
            project=project,
            reports=reports,
            os_name=args.os_name,
            python=args.python,
            nox_args=args.nox_args,
        )
    except HarnessError as exc:
        return fail("run_leg", exc)
    return exit_status(record)


if __name__ == "__main__":
    sys.exit(main())
