"""The ``harness`` command: one entry point, one module per verb.

Each module in this package that defines ``register(subparsers)`` and
``run(args) -> int`` is a verb. Modules import their heavy dependencies inside
``run`` so that ``harness exec`` starts quickly.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
from collections.abc import Sequence
from typing import Final

from harness import __version__, exit_codes
from harness.errors import HarnessError

#: The order verbs are listed in ``--help``; modules not named here follow.
VERB_ORDER: Final = (
    "exec",
    "sessions",
    "check",
    "ps",
    "reap",
    "dump",
    "env",
    "matrix",
)

DESCRIPTION = """\
Run test sessions that cannot collide and leave nothing behind.

Each session gets a leased registry port, a private bindspace for Unix
sockets, and one envelope (the _TRACTOR_RT_VARS environment variable) that
every child process inherits. Afterwards the harness reports what leaked
(socket files, processes, listeners) and can reap it.
"""

EPILOG = """\
examples:
  harness exec --name smoke -- pytest tests -x   run pytest in a new session
  harness sessions                               list live and stale sessions
  harness env --pid 4242                         show another process's envelope

`harness VERB --help` explains each verb.
"""


def _verb_modules() -> list[str]:
    found = {
        m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")
    }
    ordered = [v for v in VERB_ORDER if v in found]
    return ordered + sorted(found - set(ordered))


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The ``harness`` parser: every verb, or only *verb* when it is known.

    Building one verb's parser instead of all of them saves the start-up of
    ``harness exec`` a few tens of milliseconds; ``--help`` lists all.
    """
    parser = argparse.ArgumentParser(
        prog="harness",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"harness {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log what the harness does (-v: INFO, -vv: DEBUG)",
    )
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", title="verbs")
    names = _verb_modules()
    for name in [verb] if verb in names else names:
        module = importlib.import_module(f"{__name__}.{name}")
        sub = module.register(subparsers)
        sub.set_defaults(_run=module.run)
    return parser


def _requested_verb(words: Sequence[str]) -> str | None:
    """The verb of a command line: its first word that is not an option (the
    top-level options take no value)."""
    for word in words:
        if word == "--":
            return None
        if not word.startswith("-"):
            return word
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``harness`` command; return its exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_requested_verb(words))
    args = parser.parse_args(words)
    if args.verb is None:
        parser.print_help(sys.stderr)
        return exit_codes.USAGE
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="harness: %(message)s")
    try:
        status: int = args._run(args)
    except HarnessError as exc:
        print(f"harness {args.verb}: error: {exc}", file=sys.stderr)
        return exit_codes.HARNESS_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `harness sessions | head`: the reader left. Point stdout at
        # /dev/null so the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13  # SIGPIPE, as a shell reports it
    return status
