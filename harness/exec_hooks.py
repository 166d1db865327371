"""What ``harness exec`` plugs into a run: leak check, hang watchdog, isolation.

`build_hooks` turns the `RunOptions` of one run into the runner's `RunHooks`
(see `harness.runner` for each seam's contract). The pieces:

- isolation (``--isolate``): the command is wrapped so it runs in private
  kernel namespaces; the namespace is torn down after the leak check, and
  what that teardown killed is reported;
- the hang watchdog (``--timeout`` / ``--silence``): when a limit is hit, the
  stacks of every process of the session are captured twice, the hang
  report is written, the session's processes are reaped and the run ends
  with `exit_codes.HUNG`;
- the leak check (``--leaks``, ``--report``): once the command exited, the
  session is checked and settled by its leak mode (`harness.leak_modes`).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harness import exit_codes

if TYPE_CHECKING:
    import subprocess

    from harness.runner import RunHooks, RunOptions
    from harness.session import Session
    from harness.watchdog import HangEvent, Watchdog

log = logging.getLogger("harness.exec_hooks")

#: Seconds each signal of the reap after a hang gets before the next one.
HANG_REAP_GRACE = 2.0


@dataclass
class _RunState:
    """What the hooks of one run share."""

    dog: Watchdog | None = None
    hang: HangEvent | None = None
    command: list[str] = field(default_factory=list)
    isolation: Any = None  # harness.isolate.IsolationPlan when isolating


def build_hooks(options: RunOptions) -> RunHooks:
    """The `RunHooks` for one ``harness exec`` run with *options*."""
    from harness.runner import RunHooks

    state = _RunState()

    def command_wrapper(argv: list[str], session: Session) -> list[str]:
        state.command = list(argv)
        if state.isolation is None:
            return argv
        return list(state.isolation.wrap(argv, session))

    def spawn_options(session: Session) -> dict[str, Any]:
        rtvars = session.rtvars
        if rtvars.diag_on_hang is None and rtvars.diag_silence is None:
            return {}  # no limit: nothing to watch, and no watchdog to import
        from harness.watchdog import Watchdog

        state.dog = Watchdog.from_rtvars(rtvars)
        return state.dog.popen_kwargs()

    def watch(
        proc: subprocess.Popen[bytes], session: Session
    ) -> Callable[[], None] | None:
        if state.isolation is not None:
            state.isolation.started(proc, session)
        if state.dog is None or not state.dog.enabled:
            return None
        return state.dog.start(
            proc, lambda event: _on_hang(event, session, state, options)
        )

    def after_exit(session: Session, status: int) -> int:
        from harness.leak_modes import settle_leaks

        if state.hang is not None:
            status = exit_codes.HUNG
        helpers = state.isolation.helper_pids() if state.isolation else ()
        settlement = settle_leaks(
            session.record,
            options.leaks,
            options.report,
            command_status=status,
            exclude_pids=helpers,
        )
        session.leaks = settlement
        if state.isolation is not None:
            _tear_down(state.isolation, session, settlement)
        if settlement.report_path:
            session.update_record(report_path=settlement.report_path)
        return settlement.exit_status

    if options.isolate:
        from harness.isolate import plan

        state.isolation = plan(options.isolate)
    return RunHooks(
        command_wrapper=command_wrapper,
        spawn_options=spawn_options,
        watch=watch,
        after_exit=after_exit,
    )


def _tear_down(isolation: Any, session: Session, settlement: Any) -> None:
    """End the session's namespaces after the leak check, and say what died.

    The leak check has reported first; at level ``pid`` the teardown then
    kills whatever is left in the namespace. The exit status keeps the leak
    check's verdict, but what is left on disk is counted again, so a session
    whose only leftovers died with its namespace closes clean.
    """
    from harness.leaks import check_leaks

    ended = isolation.teardown(session)
    if ended:
        lines = "\n".join(f"  {process}" for process in ended)
        print(
            f"harness exec: ending the pid namespace of session {session.id} "
            f"killed {len(ended)} process(es):\n{lines}",
            file=sys.stderr,
            flush=True,
        )
    if settlement.leak_count:
        again = check_leaks(session.record, exclude_pids=isolation.helper_pids())
        settlement.leak_count = again.leak_count
        settlement.keep_evidence = again.leak_count > 0


def _on_hang(
    event: HangEvent, session: Session, state: _RunState, options: RunOptions
) -> None:
    """Capture, report, then reap: runs in the watchdog's thread."""
    from harness.hang_report import hang_report_path, report_hang
    from harness.leaks import check_leaks, session_processes
    from harness.reap import terminate

    state.hang = event
    path = hang_report_path(session.id, options.report)
    print(
        f"harness exec: session {session.id} hung ({event.describe()}); "
        "capturing the stacks of its processes...",
        file=sys.stderr,
        flush=True,
    )
    try:
        report_hang(
            event,
            session_id=session.id,
            targets=lambda: session_processes(session.record, include_owner=False),
            delay=session.rtvars.diag_capture_delay,
            path=path,
            command=state.command,
            bindspace=str(session.bindspace),
        )
        print(f"harness exec: hang report: {path}", file=sys.stderr, flush=True)
    finally:
        # Reap whatever the report found or not: a hung tree must not outlive
        # the session. The runner's wait on the command ends with it.
        leftovers = check_leaks(session.record, exclude_pids=(os.getpid(),))
        outcomes = terminate(leftovers.processes, grace=HANG_REAP_GRACE)
        ended = sum(1 for o in outcomes if o.outcome in ("reaped", "gone", "zombie"))
        log.info(
            "Reaped the hung session %s: %d of %d processes ended.",
            session.id,
            ended,
            len(outcomes),
        )
