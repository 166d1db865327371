"""Tests of harness.matrix and `harness matrix`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.config import config_from_table
from harness.matrix import Matrix


def matrix(**table: object) -> Matrix:
    return Matrix(config_from_table(table, source="test"))


def test_default_matrix_is_three_backends_by_two_transports() -> None:
    m = matrix()
    assert m.names() == [
        "tests-trio-tcp",
        "tests-trio-uds",
        "tests-mp_spawn-tcp",
        "tests-mp_spawn-uds",
        "tests-mp_forkserver-tcp",
        "tests-mp_forkserver-uds",
    ]
    cell = m.cell("tests-mp_spawn-uds")
    assert (cell.backend, cell.transport) == ("mp_spawn", "uds")
    assert cell.tags == ("tests", "mp_spawn", "uds")
    assert cell.pythons == ()


def test_exclusion_without_pythons_drops_cells() -> None:
    m = matrix(exclude=[{"transport": "uds", "reason": "no AF_UNIX"}])
    assert m.names() == [
        "tests-trio-tcp",
        "tests-mp_spawn-tcp",
        "tests-mp_forkserver-tcp",
    ]
    assert [e.session for e in m.excluded] == [
        "tests-trio-uds",
        "tests-mp_spawn-uds",
        "tests-mp_forkserver-uds",
    ]
    assert m.excluded[0].exclusion.reason == "no AF_UNIX"


def test_pythons_multiply_runs_and_exclusions_narrow_them() -> None:
    m = matrix(
        backends=["trio", "mp_spawn"],
        transports=["tcp", "uds"],
        pythons=["3.12", "3.13"],
        exclude=[
            {"backend": "mp_spawn", "transport": "uds", "python": "3.12"},
            {"backend": "trio", "transport": "uds"},
        ],
    )
    assert [c.session for c in m] == [
        "tests-trio-tcp",
        "tests-mp_spawn-tcp",
        "tests-mp_spawn-uds",
    ]
    assert m.cell("tests-mp_spawn-uds").pythons == ("3.13",)
    assert m.names() == [
        "tests-trio-tcp-3.12",
        "tests-trio-tcp-3.13",
        "tests-mp_spawn-tcp-3.12",
        "tests-mp_spawn-tcp-3.13",
        "tests-mp_spawn-uds-3.13",
    ]
    with pytest.raises(KeyError):
        m.cell("tests-trio-uds")


def test_github_matrix_has_one_job_per_run() -> None:
    m = matrix(backends=["trio"], pythons=["3.13"], **{"session-prefix": "it"})
    assert m.github() == {
        "include": [
            {
                "session": "it-trio-tcp-3.13",
                "backend": "trio",
                "transport": "tcp",
                "python": "3.13",
                "tags": ["it", "trio", "tcp", "it-trio-tcp"],
            },
            {
                "session": "it-trio-uds-3.13",
                "backend": "trio",
                "transport": "uds",
                "python": "3.13",
                "tags": ["it", "trio", "uds", "it-trio-uds"],
            },
        ]
    }


def harness(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


PROJECT = """\
[tool.harness]
backends = ["trio", "mp_forkserver"]
transports = ["tcp", "uds"]
exclude = [{backend = "mp_forkserver", transport = "uds", reason = "slow here"}]
"""


def test_cli_json_list_and_table_agree(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(PROJECT)
    expected = Matrix.load(tmp_path)

    out = harness("matrix", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == expected.github()
    assert len(out.stdout.strip().splitlines()) == 1

    out = harness("matrix", "--list", cwd=tmp_path)
    assert out.stdout.split() == [
        "tests-trio-tcp",
        "tests-trio-uds",
        "tests-mp_forkserver-tcp",
    ]

    out = harness("matrix", cwd=tmp_path)
    assert out.returncode == 0
    assert str(tmp_path / "pyproject.toml") in out.stdout
    for name in expected.names():
        assert name in out.stdout
    assert "excluded: slow here" in out.stdout
    assert "nox -j auto -t tests" in out.stdout


def test_cli_bad_config_exits_85_with_the_key(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.harness]\nbackend = ["trio"]\n')
    out = harness("matrix", "--json", cwd=tmp_path)
    assert out.returncode == 85
    assert out.stdout == ""
    assert "'backend'" in out.stderr
    assert "'backends'" in out.stderr
    assert str(tmp_path / "pyproject.toml") in out.stderr


def test_cli_config_option(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(PROJECT)
    out = harness(
        "matrix", "--list", "--config", str(tmp_path / "pyproject.toml"), cwd=Path("/")
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "tests-trio-tcp"
