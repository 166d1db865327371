"""What every script in ``ci/`` shares: the project, its reports, GitHub's files.

The scripts run as ``python ci/<script>.py`` from the project's root, in a
workflow step or on a developer's machine. GitHub Actions hands a step two
files through the environment: ``$GITHUB_OUTPUT`` (``name=value`` lines that
become the step's outputs) and ``$GITHUB_STEP_SUMMARY`` (Markdown shown on
the run's page); outside Actions neither is set, and the scripts print
instead.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Final

from harness import exit_codes
from harness.errors import HarnessError

log = logging.getLogger("harness.ci.cli_support")

#: The root of this repository: the folder above ``ci/``.
REPO_ROOT: Final = Path(__file__).resolve().parent.parent


def project_root(path: Path | None = None) -> Path:
    """The project to work on: *path*, or the current folder.

    Raises `HarnessError` when it holds no ``noxfile.py``, since every script
    here ends up asking nox.
    """
    project = (path or Path.cwd()).resolve()
    if not (project / "noxfile.py").is_file():
        msg = (
            f"{str(project)!r} has no noxfile.py; run this from the project's "
            "root or pass --project PATH"
        )
        raise HarnessError(msg)
    return project


def reports_dir(project: Path) -> Path:
    """The project's reports folder, ``[tool.harness] reports-dir``."""
    from harness.config import load_config

    return project / load_config(project).reports_dir


def in_github_actions() -> bool:
    """Whether this runs as a GitHub Actions step."""
    return os.environ.get("GITHUB_ACTIONS") == "true"


def fail(script: str, exc: HarnessError) -> int:
    """Print *exc* for a person (and as an annotation on GitHub); return 85."""
    message = str(exc)
    print(f"ci/{script}.py: error: {message}", file=sys.stderr)
    if in_github_actions():
        # An annotation shows on the run's page without opening the log;
        # its text is one line, with newlines escaped as GitHub requires.
        escaped = message.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
        print(f"::error title=ci/{script}.py::{escaped}", file=sys.stderr)
    return exit_codes.HARNESS_ERROR


def set_output(name: str, value: str, *, path: str | None = None) -> bool:
    """Append ``name=value`` to ``$GITHUB_OUTPUT`` (or *path*).

    Returns False, writing nothing, outside GitHub Actions. A value with a
    newline is written in the heredoc form GitHub reads for multi-line values.
    """
    target = path or os.environ.get("GITHUB_OUTPUT")
    if not target:
        return False
    with open(target, "a", encoding="utf-8") as out:
        if "\n" in value:
            delimiter = f"ghadelimiter_{os.urandom(8).hex()}"
            out.write(f"{name}<<{delimiter}\n{value}\n{delimiter}\n")
        else:
            out.write(f"{name}={value}\n")
    return True


def write_summary(markdown: str, *, path: Path | None = None) -> Path | None:
    """Append *markdown* to *path*, else to ``$GITHUB_STEP_SUMMARY``.

    Returns where it went, or None when neither is set (the caller prints).
    """
    target = path or (
        Path(os.environ["GITHUB_STEP_SUMMARY"])
        if os.environ.get("GITHUB_STEP_SUMMARY")
        else None
    )
    if target is None:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "a", encoding="utf-8") as out:
        out.write(markdown if markdown.endswith("\n") else markdown + "\n")
    return target


def setup_logging(verbose: int) -> None:
    """Log to stderr: warnings by default, INFO with -v, DEBUG with -vv."""
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="ci: %(message)s")
