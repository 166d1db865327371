"""The hang report: two stack snapshots of a session, compared, as text.

When a session hangs, one snapshot of every process's stacks shows where each
one is; a second one a little later (``diag_capture_delay``) shows which of
them are stuck and which still move. The report (``hang.txt``) puts both
together: a header (session, limit hit, times), a table of the processes,
then for each process its threads, innermost call first, each frame marked

- ``=`` when it is the same call in both snapshots (the thread is still in
  it: a stuck frame, or one that returned and came back to the same line);
- ``~`` when it changed between the snapshots (or is new in the second);
- `` `` when only one snapshot exists for the process.

`report_hang` is the whole sequence for the runner: snapshot, wait,
snapshot, write. ``harness dump`` uses the same pieces on a live session.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from harness.atomic_write import write_atomic
from harness.errors import HarnessError
from harness.stacks import ProcessStacks, Target, ThreadStack, capture_stacks
from harness.watchdog import HangEvent

log = logging.getLogger("harness.hang_report")

REPORT_NAME = "hang.txt"

Targets = Sequence[Target] | Callable[[], Sequence[Target]]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The stacks of a session's processes, captured once."""

    taken_at: float
    processes: tuple[ProcessStacks, ...]

    def by_pid(self) -> dict[int, ProcessStacks]:
        return {p.pid: p for p in self.processes}


@dataclass(frozen=True, slots=True)
class HangReport:
    """A written (or rendered) report and what it was made of."""

    text: str
    first: Snapshot
    second: Snapshot | None
    path: Path | None = None


def hang_report_path(
    session_id: str,
    report: str | os.PathLike[str] | None = None,
    cwd: Path | None = None,
) -> Path:
    """Where the hang report of *session_id* goes.

    Beside the run's ``--report PATH`` when there is one, else
    ``reports/<session-id>/hang.txt`` under *cwd* (default: the current
    folder). The path is absolute.
    """
    base = Path.cwd() if cwd is None else cwd
    if report is not None:
        return (base / Path(report)).resolve().parent / REPORT_NAME
    return (base / "reports" / session_id / REPORT_NAME).resolve()


def take_snapshots(
    targets: Targets, *, delay: float, **capture: Any
) -> tuple[Snapshot, Snapshot | None]:
    """Capture *targets*, wait *delay* seconds, capture again.

    *targets* may be a callable that finds the processes, called before each
    snapshot, so a process started in between is caught by the second one.
    With ``delay <= 0`` only one snapshot is taken. *capture* goes to
    `capture_stacks` (``py_spy``, ``signum``, ``bindspace``, ``timeout``).
    """
    first = _snapshot(targets, capture)
    if delay <= 0:
        return first, None
    # The delay counts from the end of the first capture: on a loaded host
    # capturing many processes takes a while, and the gap between the two
    # looks at each process is what shows movement.
    time.sleep(delay)
    return first, _snapshot(targets, capture)


def _snapshot(targets: Targets, capture: dict[str, Any]) -> Snapshot:
    found = targets() if callable(targets) else targets
    taken_at = time.time()
    return Snapshot(taken_at, tuple(capture_stacks(found, **capture)))


def unchanged_depth(before: ThreadStack | None, after: ThreadStack) -> int | None:
    """How many of *after*'s outermost frames are the same in *before*.

    ``None`` when there is nothing to compare with. Frames are compared from
    the outermost call inwards; the first difference ends the run, since
    everything called from a changed frame is a new call.
    """
    if before is None:
        return None
    same = 0
    for old, new in zip(reversed(before.frames), reversed(after.frames), strict=False):
        if old != new:
            break
        same += 1
    return same


def render_hang_report(
    *,
    session_id: str,
    first: Snapshot,
    second: Snapshot | None,
    event: HangEvent | None = None,
    command: Sequence[str] | None = None,
) -> str:
    """The text of the report; see the module docstring for its layout."""
    latest = second or first
    earlier = first.by_pid() if second is not None else {}
    procs = _tree_order(list(latest.processes))
    out: list[str] = []
    title = "HANG REPORT" if event is not None else "STACK DUMP"
    out.append(f"{title}  session {session_id}")
    out.append("=" * 78)
    rows: list[tuple[str, str]] = []
    if event is not None:
        rows.append(("limit hit", event.describe()))
    if command:
        rows.append(("command", " ".join(command)))
    if event is not None:
        rows.append(("started", _when(event.started_at)))
        rows.append(
            ("hung at", f"{_when(event.detected_at)}  (+{event.elapsed:.1f} s)")
        )
    rows.append(("snapshot 1", _when(first.taken_at)))
    if second is not None:
        gap = second.taken_at - first.taken_at
        rows.append(("snapshot 2", f"{_when(second.taken_at)}  ({gap:.1f} s later)"))
    captured = [p for p in procs if p.captured]
    by_method = {
        m: sum(1 for p in captured if p.method == m) for m in ("py-spy", "faulthandler")
    }
    rows.append(
        (
            "processes",
            f"{len(procs)}: {by_method['py-spy']} by py-spy, "
            f"{by_method['faulthandler']} by faulthandler, "
            f"{len(procs) - len(captured)} not captured",
        )
    )
    width = max(len(k) for k, _ in rows)
    out.extend(f"{key:<{width}}  {value}" for key, value in rows)
    out.append("")
    out.extend(_summary_table(procs, earlier))
    out.append("")
    if second is not None:
        out.append("Frames, innermost call first:  = same in both snapshots")
        out.append("                               ~ changed between them")
    else:
        out.append("Frames, innermost call first (one snapshot: no movement shown).")
    for proc in procs:
        out.append("")
        out.extend(_process_section(proc, earlier.get(proc.pid), second is not None))
    missing = [p for p in procs if not p.captured]
    if missing:
        out.append("")
        out.append("NOT CAPTURED")
        out.extend(
            f"  pid {p.pid:<8} {_clip(p.command, 50)}: {p.error}" for p in missing
        )
    out.append("")
    return "\n".join(out)


def _when(stamp: float) -> str:
    moment = datetime.fromtimestamp(stamp).astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + moment.strftime(" %Z")


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _tree_order(procs: list[ProcessStacks]) -> list[ProcessStacks]:
    """Parents before their children, siblings by pid; orphans as roots."""
    pids = {p.pid for p in procs}
    children: dict[int | None, list[ProcessStacks]] = {}
    for proc in procs:
        parent = proc.ppid if proc.ppid in pids else None
        children.setdefault(parent, []).append(proc)
    ordered: list[ProcessStacks] = []

    def walk(parent: int | None) -> None:
        for proc in sorted(children.get(parent, []), key=lambda p: p.pid):
            ordered.append(proc)
            walk(proc.pid)

    walk(None)
    return ordered


def _stuck_count(
    proc: ProcessStacks, before: ProcessStacks | None
) -> tuple[int, int] | None:
    """``(threads with no frame changed, threads)``, or ``None`` if unknown."""
    if before is None or not before.captured or not proc.captured:
        return None
    old = {t.ident: t for t in before.threads}
    stuck = 0
    for thread in proc.threads:
        same = unchanged_depth(old.get(thread.ident), thread)
        if same is not None and same == len(thread.frames) == len(
            old[thread.ident].frames
        ):
            stuck += 1
    return stuck, len(proc.threads)


def _summary_table(
    procs: list[ProcessStacks], earlier: dict[int, ProcessStacks]
) -> list[str]:
    header = ("PID", "PPID", "HOW", "METHOD", "THREADS", "STUCK", "COMMAND")
    rows = []
    for proc in procs:
        counts = _stuck_count(proc, earlier.get(proc.pid))
        rows.append(
            (
                str(proc.pid),
                "-" if proc.ppid is None else str(proc.ppid),
                proc.how,
                proc.method or "none",
                str(len(proc.threads)) if proc.captured else "-",
                "-" if counts is None else f"{counts[0]}/{counts[1]}",
                _clip(proc.command, 60),
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [f"{cell:<{w}}" for cell, w in zip(row, widths, strict=False)]
        lines.append("  " + "  ".join([*cells, row[-1]]).rstrip())
    return lines


def _process_section(
    proc: ProcessStacks, before: ProcessStacks | None, compared: bool
) -> list[str]:
    out = [f"-- process {proc.pid} " + "-" * max(0, 64 - len(str(proc.pid)))]
    rows = [
        ("command", proc.command),
        ("parent", "-" if proc.ppid is None else str(proc.ppid)),
        ("attributed", proc.how),
    ]
    if proc.captured:
        method: str = proc.method or ""
        if before is not None and before.method and before.method != proc.method:
            method = f"{before.method} (snapshot 1), {proc.method} (snapshot 2)"
        rows.append(("captured by", method))
        rows.extend(("tried first", note) for note in proc.notes)
    else:
        rows.append(("not captured", proc.error or "unknown reason"))
    out.extend(f"{key:<12}  {value}" for key, value in rows)
    if not proc.captured:
        return out
    if not proc.threads:
        out.append("")
        out.append("  (no Python thread found; the tool's output was:)")
        out.extend(f"  | {line}" for line in proc.raw.splitlines()[:40])
        return out
    old_threads = {} if before is None else {t.ident: t for t in before.threads}
    for thread in proc.threads:
        out.append("")
        old = old_threads.get(thread.ident) if compared else None
        same = unchanged_depth(old, thread)
        out.append(_thread_line(thread, old, same, compared))
        total = len(thread.frames)
        if not thread.frames:
            out.append("    (no Python frame)")
        width = max((len(f.function) for f in thread.frames), default=0)
        for index, frame in enumerate(thread.frames):
            mark = _mark(index, total, same)
            out.append(f"  {mark} {frame.function:<{width}}  {frame.where()}")
    return out


def _mark(index: int, total: int, same: int | None) -> str:
    """The mark of frame *index* (innermost first) of a thread of *total*."""
    if same is None:
        return " "
    return "=" if index >= total - same else "~"


def _thread_line(
    thread: ThreadStack, old: ThreadStack | None, same: int | None, compared: bool
) -> str:
    label = f"thread {thread.ident}"
    if thread.name:
        label += f' "{thread.name}"'
    if thread.state:
        label += f" ({thread.state})"
    if not compared:
        return label
    if old is None or same is None:
        return f"{label}: new since snapshot 1"
    total = len(thread.frames)
    if same == total == len(old.frames):
        return f"{label}: STUCK, no frame changed between the snapshots"
    return f"{label}: moving, {total - same} of {total} frames changed"


def write_hang_report(path: Path, text: str) -> Path:
    """Write *text* to *path* (folders created), atomically; return *path*.

    Raises `HarnessError` naming the path when it cannot be written.
    """
    try:
        write_atomic(path, text.encode("utf-8"))
    except OSError as exc:
        msg = (
            f"cannot write the hang report {str(path)!r}: {exc.strerror}; pass "
            "--report with a writable folder, or run from one"
        )
        raise HarnessError(msg) from None
    return path


def report_hang(
    event: HangEvent | None,
    *,
    session_id: str,
    targets: Targets,
    delay: float,
    path: Path | None,
    command: Sequence[str] | None = None,
    **capture: Any,
) -> HangReport:
    """Snapshot *targets* twice, *delay* seconds apart, and write the report.

    *path* ``None`` renders without writing. Kills nothing: reaping is the
    caller's next step. *capture* goes to `capture_stacks`.
    """
    first, second = take_snapshots(targets, delay=delay, **capture)
    text = render_hang_report(
        session_id=session_id,
        first=first,
        second=second,
        event=event,
        command=command,
    )
    if path is not None:
        write_hang_report(path, text)
        log.info("Wrote the hang report %s.", path)
    return HangReport(text=text, first=first, second=second, path=path)
