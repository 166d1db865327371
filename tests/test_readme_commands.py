"""The README's two commands stay what CI and the matrix really run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _command_after(text: str, heading: str) -> str:
    """The first console block after the bold *heading* in the README."""
    start = text.index(heading)
    match = re.search(r"```console\n(.+?)\n```", text[start:], re.DOTALL)
    assert match, f"no console block after {heading!r}"
    return match.group(1).strip()


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    command = _command_after(readme, "**The tests**")
    ci_lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert ci_lines[-1] == command


def test_the_main_job_runs_the_nox_matrix_of_this_repo() -> None:
    readme = (ROOT / "README.md").read_text()
    command = _command_after(readme, "**The main job**")
    install = _command_after(readme, "**The tests**").rsplit("&&", 1)[0]
    # Same install as the tests, then every session tagged `tests`, at once.
    assert command.startswith(install)
    assert command.endswith("nox -j auto -t tests")
    noxfile = (ROOT / "noxfile.py").read_text()
    assert "harness.nox_sessions" in noxfile
