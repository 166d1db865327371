"""Tests of harness.config: [tool.harness] loading and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.config import (
    CONFIG_KEYS,
    DEFAULT_BACKENDS,
    DEFAULT_TRANSPORTS,
    HarnessConfig,
    config_from_table,
    find_pyproject,
    load_config,
    resolve_leaks_mode,
)
from harness.errors import HarnessError
from harness.rtvars import RT_VARS_ENV


def write(folder: Path, text: str) -> Path:
    path = folder / "pyproject.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_table(tmp_path: Path) -> None:
    path = write(tmp_path, '[project]\nname = "x"\n')
    config = load_config(path)
    assert config.backends == list(DEFAULT_BACKENDS)
    assert config.transports == list(DEFAULT_TRANSPORTS)
    assert config.pythons == []
    assert config.command == "pytest {posargs}"
    assert config.flags == ["--spawn-backend={backend}", "--tpt-proto={transport}"]
    assert config.session_prefix == "tests"
    assert config.envelope_name == RT_VARS_ENV
    assert config.bindspace_name == "tractor"
    assert config.leaks == "auto"
    assert config.source == str(path.resolve())


def test_defaults_without_pyproject(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # /tmp-style folder with no pyproject.toml above it.
    monkeypatch.chdir(tmp_path)
    if find_pyproject(tmp_path) is not None:
        pytest.skip("a pyproject.toml exists above the temp dir")
    assert load_config().source == "defaults"


def test_kebab_case_keys_are_read(tmp_path: Path) -> None:
    write(
        tmp_path,
        """
[tool.harness]
backends = ["trio"]
transports = ["uds"]
pythons = ["3.12", "3.13"]
session-prefix = "itests"
envelope-name = "_MY_RT_VARS"
bindspace-name = "myrt"
junit-xml = false
reports-dir = "out"
leaks = "reap"
isolate = "net,pid"
timeout = 600
silence = 12.5
install = ["-e", ".[test]"]
command = "pytest tests/integration {posargs}"
flags = ["--backend={backend}"]
exclude = [{python = "3.12", reason = "no AF_UNIX"}]
""",
    )
    config = load_config(tmp_path)
    assert config.backends == ["trio"]
    assert config.session_prefix == "itests"
    assert config.envelope_name == "_MY_RT_VARS"
    assert config.bindspace_name == "myrt"
    assert config.junit_xml is False
    assert config.reports_dir == "out"
    assert config.timeout == 600.0
    assert config.silence == 12.5
    assert config.isolate == "net,pid"
    assert config.install == ["-e", ".[test]"]
    assert config.exclude[0].python == "3.12"
    assert config.exclude[0].reason == "no AF_UNIX"


def test_found_upwards_from_a_subfolder(tmp_path: Path) -> None:
    write(tmp_path, '[tool.harness]\nbackends = ["trio"]\n')
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    assert load_config(sub).backends == ["trio"]


def test_every_key_is_documented() -> None:
    docs = (Path(__file__).parents[1] / "docs" / "matrix.md").read_text()
    missing = [key for key in CONFIG_KEYS if f"`{key}`" not in docs]
    assert missing == []


@pytest.mark.parametrize(
    ("table", "needles"),
    [
        # Typo of a key: named, with its value and a suggestion.
        ({"transport": ["tcp"]}, ["'transport'", "['tcp']", "'transports'"]),
        ({"session_prefix": "x"}, ["'session_prefix'", "'session-prefix'"]),
        ({"zzz": 1}, ["'zzz'", "known keys"]),
        (
            {"exclude": [{"backend": "trio", "transprt": "uds"}]},
            ["'exclude[0].transprt'", "'exclude[0].transport'"],
        ),
        # Wrong types: the key path and the value.
        ({"backends": ["trio", 3]}, ["backends[1]", "3", "Expected `str`"]),
        ({"timeout": "ten"}, ["timeout", "'ten'"]),
        ({"leaks": "loud"}, ["leaks", "'loud'"]),
        ({"isolate": "net,user"}, ["isolate", "'net,user'", "commas"]),
        ({"junit-xml": "yes"}, ["junit-xml", "'yes'"]),
        # Values types cannot catch.
        ({"backends": []}, ["backends", "at least one"]),
        ({"backends": ["mp-spawn"]}, ["'mp-spawn'", "'-'"]),
        ({"transports": ["tcp", "tcp"]}, ["transports", "once"]),
        ({"timeout": 0}, ["timeout", "above 0"]),
        ({"envelope-name": "1BAD"}, ["envelope-name", "'1BAD'"]),
        (
            {"command": "pytest {backnd}"},
            ["command", "{backnd}", "unknown placeholder"],
        ),
        ({"flags": ["--x={posargs}"]}, ["flags[0]", "stand alone"]),
        ({"command": "pytest {"}, ["command", "'pytest {'"]),
        ({"exclude": [{"reason": "x"}]}, ["exclude[0]", "at least one"]),
        ({"exclude": [{"backend": "asyncio"}]}, ["exclude[0].backend", "'asyncio'"]),
        ({"exclude": [{"python": "3.12"}]}, ["exclude[0].python", "'3.12'"]),
    ],
)
def test_bad_tables_name_key_value_and_file(table: dict, needles: list[str]) -> None:
    with pytest.raises(HarnessError) as info:
        config_from_table(table, source="/p/pyproject.toml")
    message = str(info.value)
    assert "/p/pyproject.toml" in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[tool.harness\n")
    with pytest.raises(HarnessError, match="not valid TOML") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="no such file"):
        load_config(tmp_path / "nope.toml")


def test_table_must_be_a_table() -> None:
    with pytest.raises(HarnessError, match="must be a table"):
        config_from_table(["x"], source="f")


@pytest.mark.parametrize(
    ("mode", "ci", "expected"),
    [
        ("auto", None, "warn"),
        ("auto", "true", "fail"),
        ("auto", "1", "fail"),
        ("auto", "false", "warn"),
        ("auto", "", "warn"),
        ("reap", "true", "reap"),
        ("warn", "true", "warn"),
    ],
)
def test_leaks_mode(mode: str, ci: str | None, expected: str) -> None:
    config = HarnessConfig(leaks=mode)  # type: ignore[arg-type]
    env = {} if ci is None else {"CI": ci}
    assert resolve_leaks_mode(config, env) == expected
