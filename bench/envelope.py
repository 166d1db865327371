"""How fast the envelope encodes and decodes, next to msgspec.json and json.

Run ``python bench/envelope.py`` (about a minute) or ``--quick`` (a few
seconds). Every row turns the same realistic `RuntimeVars` into text and back
into a `RuntimeVars`, so the rows compare like with like:

- envelope: `dump_rtvars` / `load_rtvars` (repr + ast.literal_eval, bounded);
- msgspec.json: ``msgspec.json.encode`` / ``decode(type=RuntimeVars)``;
- json: ``json.dumps(to_builtins)`` / ``json.loads`` + ``msgspec.convert``
  (json alone would lose the tuples).

Two more rows show where the envelope's time goes: ``ast.literal_eval``
alone on the same text (the parser, the floor of this encoding), and a
hand-written envelope that is not shaped like repr() output and so takes the
slower, fully checked path.

Figures are medians of per-call times over many rounds in which the rows take
turns; the machine's noise shows in the spread column (the 90th percentile
over the median).
"""

from __future__ import annotations

import argparse
import ast
import json
import platform
import statistics
import sys
import timeit
from collections.abc import Callable
from typing import Any

import msgspec

from harness.rtvars import RT_VARS_ENV, RuntimeVars, dump_rtvars, load_rtvars

#: An envelope as a session writes it: a TCP registry, the bindspace, limits.
REALISTIC = RuntimeVars(
    session="tests-mp_forkserver-tcp-3f9a2c1b",
    spawn_backend="mp_forkserver",
    tpt_proto="tcp",
    bindspace="/run/user/1000/tractor/tests-mp_forkserver-tcp-3f9a2c1b",
    diag_on_hang=600.0,
    diag_silence=120.0,
    diag_signal="SIGUSR2",
    loglevel="cancel",
    _registry_addrs=[("127.0.0.1", 24117)],
    _enable_tpts=["tcp"],
    _root_mailbox=("127.0.0.1", 24117),
    _debug_mode=False,
)

#: The same fields written by hand: double quotes, lists for tuples, newlines.
HAND_WRITTEN = """{
    "session": "tests-mp_forkserver-tcp-3f9a2c1b",
    "spawn_backend": "mp_forkserver", "tpt_proto": "tcp",
    "bindspace": "/run/user/1000/tractor/tests-mp_forkserver-tcp-3f9a2c1b",
    "diag_on_hang": 600.0, "diag_silence": 120.0, "diag_signal": "SIGUSR2",
    "loglevel": "cancel",
    "_registry_addrs": [["127.0.0.1", 24117]], "_enable_tpts": ["tcp"],
    "_root_mailbox": ["127.0.0.1", 24117],
}"""


def calibrate(call: Callable[[], Any], budget: float) -> int:
    """How many calls make one timing of at least *budget* seconds."""
    number = 1
    while timeit.timeit(call, number=number) < budget:
        number *= 2
    return number


def measure(
    calls: list[Callable[[], Any]], *, rounds: int, budget: float
) -> list[list[float]]:
    """Per-call times in microseconds: one list per call, one time per round.

    The calls take turns within each round, so a burst of load from other
    processes slows every row alike instead of one row by chance.
    """
    numbers = [calibrate(call, budget) for call in calls]
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):
        for call, number, row in zip(calls, numbers, times, strict=True):
            row.append(timeit.timeit(call, number=number) / number * 1e6)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer, shorter rounds (a few seconds)"
    )
    args = parser.parse_args(argv)
    rounds, budget = (9, 0.02) if args.quick else (41, 0.1)

    _, envelope_text = dump_rtvars(REALISTIC)
    env = {RT_VARS_ENV: envelope_text}
    hand_env = {RT_VARS_ENV: HAND_WRITTEN}
    msgspec_text = msgspec.json.encode(REALISTIC)
    json_text = json.dumps(msgspec.to_builtins(REALISTIC))

    # Every decoder must give back the struct, or the comparison means nothing.
    assert load_rtvars(env) == REALISTIC
    assert load_rtvars(hand_env) == REALISTIC
    assert msgspec.json.decode(msgspec_text, type=RuntimeVars) == REALISTIC
    assert msgspec.convert(json.loads(json_text), RuntimeVars) == REALISTIC

    rows: list[tuple[str, str, Callable[[], Any]]] = [
        ("envelope", "encode", lambda: dump_rtvars(REALISTIC)),
        ("envelope", "decode", lambda: load_rtvars(env)),
        ("msgspec.json", "encode", lambda: msgspec.json.encode(REALISTIC)),
        (
            "msgspec.json",
            "decode",
            lambda: msgspec.json.decode(msgspec_text, type=RuntimeVars),
        ),
        ("json", "encode", lambda: json.dumps(msgspec.to_builtins(REALISTIC))),
        (
            "json",
            "decode",
            lambda: msgspec.convert(json.loads(json_text), RuntimeVars),
        ),
        ("ast.literal_eval alone", "decode", lambda: ast.literal_eval(envelope_text)),
        ("envelope, hand-written", "decode", lambda: load_rtvars(hand_env)),
    ]
    all_times = measure([call for _, _, call in rows], rounds=rounds, budget=budget)
    results = {}
    for (what, direction, _), times in zip(rows, all_times, strict=True):
        results[what, direction] = (
            statistics.median(times),
            statistics.quantiles(times, n=10)[-1] / statistics.median(times),
        )

    from rich.console import Console
    from rich.table import Table

    envelope_decode = results["envelope", "decode"][0]
    table = Table(
        title=(
            f"envelope of {len(envelope_text)} characters; Python "
            f"{platform.python_version()}, msgspec {msgspec.__version__}"
            + (", --quick" if args.quick else "")
        ),
        title_justify="left",
    )
    table.add_column("codec", no_wrap=True)
    table.add_column("direction")
    table.add_column("median µs", justify="right")
    table.add_column("spread p90/p50", justify="right")
    table.add_column("speed vs envelope decode", justify="right")
    for (what, direction), (median, spread) in results.items():
        ratio = ""
        if direction == "decode" and what != "envelope":
            factor = envelope_decode / median
            ratio = f"{factor:.1f}x" if factor >= 1 else f"1/{1 / factor:.1f}"
        table.add_row(what, direction, f"{median:.1f}", f"{spread:.2f}", ratio)
    console = Console()
    console.print(table)
    verdict = "under" if envelope_decode < 100 else "OVER"
    console.print(
        f"envelope decode: {envelope_decode:.1f} µs median, {verdict} the "
        "100 µs budget."
    )
    return 0 if envelope_decode < 100 else 1


if __name__ == "__main__":
    sys.exit(main())
