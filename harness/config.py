"""The ``[tool.harness]`` table of a project's ``pyproject.toml``.

It configures the test matrix (spawn backends x transports x Python versions,
minus exclusions), the test command each cell runs, and the session settings
the nox sessions hand to ``harness exec``. Keys are kebab-case, every key has
a default, and the whole table may be absent.

Validation is strict on purpose: an unknown key (a typo such as
``transport`` for ``transports``), a value of the wrong type, an unknown
placeholder in the command or an exclusion naming a backend that is not in
the matrix is a `HarnessError` naming the file, the key and the value, so a
mistake never silently changes which sessions run.
"""

from __future__ import annotations

import difflib
import logging
import re
import string
import tomllib
from pathlib import Path
from typing import Any, Final, Literal

import msgspec

from harness.errors import HarnessError
from harness.rtvars import RT_VARS_ENV

log = logging.getLogger("harness.config")

#: The file and table the configuration lives in.
PYPROJECT: Final = "pyproject.toml"
TABLE: Final = "tool.harness"

#: tractor's spawn backends and transports: the defaults of the matrix.
DEFAULT_BACKENDS: Final = ("trio", "mp_spawn", "mp_forkserver")
DEFAULT_TRANSPORTS: Final = ("tcp", "uds")

#: Placeholders a command or flag may use; ``{posargs}`` must stand alone as
#: one word because it expands to zero or more arguments.
PLACEHOLDERS: Final = frozenset(
    {"backend", "transport", "python", "session", "posargs"}
)

#: Names that end up in session names and tags: no dashes (they separate the
#: parts of ``tests-<backend>-<transport>``), no spaces, nothing a shell or a
#: GitHub Actions expression would trip over.
_NAME = re.compile(r"^[A-Za-z0-9_.]+$")
_PREFIX = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*$")
_PYTHON = re.compile(r"^[A-Za-z0-9_.]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

LeaksMode = Literal["auto", "fail", "warn", "reap"]
#: What ``harness exec --isolate`` takes; several join with commas.
ISOLATE_LEVELS: Final = ("none", "net", "pid", "auto")


class Exclusion(
    msgspec.Struct, kw_only=True, rename="kebab", forbid_unknown_fields=True
):
    """Cells of the matrix not to run; an unset field matches anything."""

    backend: str | None = None
    transport: str | None = None
    python: str | None = None
    reason: str = ""
    """Shown by ``harness matrix`` next to the cells this removes."""

    def matches(self, backend: str, transport: str, python: str | None) -> bool:
        """Whether this exclusion removes the cell (*backend*, *transport*,
        *python*)."""
        return (
            (self.backend is None or self.backend == backend)
            and (self.transport is None or self.transport == transport)
            and (self.python is None or self.python == python)
        )


class HarnessConfig(
    msgspec.Struct, kw_only=True, rename="kebab", forbid_unknown_fields=True
):
    """The validated ``[tool.harness]`` table; see docs/matrix.md."""

    backends: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_BACKENDS))
    transports: list[str] = msgspec.field(
        default_factory=lambda: list(DEFAULT_TRANSPORTS)
    )
    pythons: list[str] = msgspec.field(default_factory=list)
    """Python versions for nox (``"3.13"``); empty: the interpreter running
    nox, and no Python axis in the matrix."""
    exclude: list[Exclusion] = msgspec.field(default_factory=list)

    command: str = "pytest {posargs}"
    """The test command; split like a shell line, placeholders filled in."""
    flags: list[str] = msgspec.field(
        default_factory=lambda: ["--spawn-backend={backend}", "--tpt-proto={transport}"]
    )
    """Appended to the command; tractor's flag set by default."""
    junit_xml: bool = True
    """Append ``--junitxml=<reports>/junit.xml`` (for pytest commands)."""

    session_prefix: str = "tests"
    """Sessions are named ``<prefix>-<backend>-<transport>``."""
    install: list[str] = msgspec.field(default_factory=lambda: ["-e", ".", "pytest"])
    """Arguments to ``pip install`` in each session's virtualenv."""
    reports_dir: str = "reports"
    """Folder (relative to the project) for JUnit XML and leak reports."""

    envelope_name: str = RT_VARS_ENV
    bindspace_name: str = "tractor"
    """The folder under the runtime dir that holds sessions' bindspaces."""

    leaks: LeaksMode = "auto"
    """``harness exec --leaks``; ``auto`` is ``fail`` when ``$CI`` is set and
    ``warn`` otherwise."""
    isolate: str = "none"
    """``harness exec --isolate``: ``none``, ``net``, ``pid``, ``auto``, or
    several joined with commas (``"net,pid"``)."""
    timeout: float | None = None
    """``harness exec --timeout``: wall-clock limit in seconds."""
    silence: float | None = None
    """``harness exec --silence``: seconds without output that count as a
    hang."""

    source: str = ""
    """Where this configuration was read from (not a key of the table)."""


#: Keys a user may write, in kebab-case, for error messages and docs.
def _keys(struct: type[msgspec.Struct]) -> list[str]:
    return [f.encode_name for f in msgspec.structs.fields(struct)]


CONFIG_KEYS: Final = tuple(k for k in _keys(HarnessConfig) if k != "source")
EXCLUSION_KEYS: Final = tuple(_keys(Exclusion))


def find_pyproject(start: Path | None = None) -> Path | None:
    """The nearest ``pyproject.toml`` at or above *start* (default: cwd)."""
    here = (start or Path.cwd()).resolve()
    if here.is_file():
        here = here.parent
    for folder in (here, *here.parents):
        candidate = folder / PYPROJECT
        if candidate.is_file():
            return candidate
    return None


def load_config(path: Path | str | None = None) -> HarnessConfig:
    """Read and validate ``[tool.harness]``.

    *path* is a ``pyproject.toml`` or a folder to search upwards from
    (default: the current directory). Without a ``pyproject.toml`` or
    without the table, the defaults apply. Raises `HarnessError` for an
    unreadable file or an invalid table, naming the file, key and value.
    """
    if path is None or Path(path).is_dir():
        found = find_pyproject(Path(path) if path is not None else None)
        if found is None:
            log.debug("No %s found; using the default matrix.", PYPROJECT)
            return _finish(HarnessConfig(source="defaults"), None)
        pyproject = found
    else:
        pyproject = Path(path)
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except FileNotFoundError:
        msg = f"no such file {str(pyproject)!r}; pass the project's pyproject.toml"
        raise HarnessError(msg) from None
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"cannot read {str(pyproject)!r}: {exc}"
        raise HarnessError(msg) from None
    except tomllib.TOMLDecodeError as exc:
        msg = f"{str(pyproject)!r} is not valid TOML: {exc}; fix the file"
        raise HarnessError(msg) from None
    table = data.get("tool", {}).get("harness")
    if table is None:
        log.debug("%s has no [%s] table; using the defaults.", pyproject, TABLE)
        table = {}
    return config_from_table(table, source=str(pyproject.resolve()))


def config_from_table(table: Any, *, source: str = "<table>") -> HarnessConfig:
    """Validate a ``[tool.harness]`` table already parsed from TOML.

    *source* names the file in error messages. Raises `HarnessError`.
    """
    where = f"[{TABLE}] in {source!r}"
    if not isinstance(table, dict):
        msg = f"{where} must be a table, got {type(table).__name__} {table!r}"
        raise HarnessError(msg)
    _check_unknown(table, CONFIG_KEYS, where, "")
    for index, item in enumerate(table.get("exclude") or []):
        if isinstance(item, dict):
            _check_unknown(item, EXCLUSION_KEYS, where, f"exclude[{index}].")
    try:
        config = msgspec.convert(table, HarnessConfig, strict=True)
    except msgspec.ValidationError as exc:
        raise HarnessError(_explain(exc, table, where)) from None
    config.source = source
    return _finish(config, where)


def _check_unknown(
    table: dict[str, Any], known: tuple[str, ...], where: str, prefix: str
) -> None:
    for key, value in table.items():
        if key in known:
            continue
        close = difflib.get_close_matches(key.replace("_", "-"), known, n=1, cutoff=0.6)
        hint = (
            f"did you mean {prefix + close[0]!r}?"
            if close
            else f"known keys: {', '.join(known)}"
        )
        msg = f"{where}: unknown key {prefix + key!r} = {value!r}; {hint}"
        raise HarnessError(msg)


_PATH_PART = re.compile(r"\.([A-Za-z0-9_-]+)|\[(\d+)\]")


def _explain(exc: msgspec.ValidationError, table: dict[str, Any], where: str) -> str:
    # msgspec says "Expected `str`, got `int` - at `$.backends[0]`"; name the
    # key the user wrote and show the value found there.
    text = str(exc)
    problem, _, at = text.partition(" - at `$")
    path = at.rstrip("`")
    value: Any = table
    for match in _PATH_PART.finditer(path):
        key, index = match.groups()
        try:
            value = value[key] if key is not None else value[int(index)]
        except (KeyError, IndexError, TypeError):
            value = None
            break
    key_text = path.lstrip(".") or "the table"
    return f"{where}: {key_text} = {value!r} is invalid: {problem}; fix the value"


def _finish(config: HarnessConfig, where: str | None) -> HarnessConfig:
    """Check what types alone cannot: names, placeholders, exclusions."""
    where = where or "the default configuration"

    def fail(key: str, value: object, fix: str) -> None:
        msg = f"{where}: {key} = {value!r} is invalid: {fix}"
        raise HarnessError(msg)

    for key, names in (
        ("backends", config.backends),
        ("transports", config.transports),
    ):
        if not names:
            fail(key, names, f"list at least one (the default is {_default(key)!r})")
        for name in names:
            if not _NAME.match(name):
                fail(
                    key,
                    name,
                    "use letters, digits, '_' and '.' only (a '-' would split "
                    "the session name)",
                )
        if len(set(names)) != len(names):
            fail(key, names, "list each name once")
    for python in config.pythons:
        if not _PYTHON.match(python):
            fail("pythons", python, "write a version such as '3.13' or 'pypy3.10'")
    if len(set(config.pythons)) != len(config.pythons):
        fail("pythons", config.pythons, "list each version once")
    if not _PREFIX.match(config.session_prefix):
        fail(
            "session-prefix",
            config.session_prefix,
            "use letters, digits, '_', '.' and '-', starting with a letter or digit",
        )
    if not _ENV_NAME.match(config.envelope_name):
        fail("envelope-name", config.envelope_name, "use an environment variable name")
    if not _NAME.match(config.bindspace_name):
        fail("bindspace-name", config.bindspace_name, "use a plain folder name")
    levels = [level.strip() for level in config.isolate.split(",")]
    if not all(level in ISOLATE_LEVELS for level in levels):
        fail(
            "isolate",
            config.isolate,
            f"use {', '.join(ISOLATE_LEVELS)}, or several joined with commas",
        )
    for key, limit in (("timeout", config.timeout), ("silence", config.silence)):
        if limit is not None and not limit > 0:
            fail(key, limit, "give a number of seconds above 0, or leave it out")

    _check_template("command", config.command, fail)
    for index, flag in enumerate(config.flags):
        _check_template(f"flags[{index}]", flag, fail)

    axes = {
        "backend": config.backends,
        "transport": config.transports,
        "python": config.pythons,
    }
    for index, exclusion in enumerate(config.exclude):
        fields = {
            "backend": exclusion.backend,
            "transport": exclusion.transport,
            "python": exclusion.python,
        }
        if all(value is None for value in fields.values()):
            fail(
                f"exclude[{index}]",
                {"reason": exclusion.reason},
                "name at least one of backend, transport, python",
            )
        for axis, value in fields.items():
            if value is not None and value not in axes[axis]:
                known = ", ".join(axes[axis]) or "none configured"
                fail(
                    f"exclude[{index}].{axis}",
                    value,
                    f"it is not in the matrix ({axis}s: {known})",
                )
    return config


def _default(key: str) -> list[str]:
    return list(DEFAULT_BACKENDS if key == "backends" else DEFAULT_TRANSPORTS)


def _check_template(key: str, template: str, fail: Any) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    except ValueError as exc:
        fail(key, template, f"{exc} (write a literal brace as '{{{{' or '}}}}')")
        return
    for field in fields:
        if field not in PLACEHOLDERS:
            known = ", ".join("{" + p + "}" for p in sorted(PLACEHOLDERS))
            fail(key, template, f"unknown placeholder {{{field}}}; known: {known}")
    if "{posargs}" in template and any(
        "{posargs}" in word and word != "{posargs}" for word in template.split()
    ):
        fail(key, template, "{posargs} must stand alone, separated by spaces")


def resolve_leaks_mode(config: HarnessConfig, env: dict[str, str]) -> str:
    """The ``harness exec --leaks`` mode: ``auto`` is ``fail`` under CI
    (``$CI`` set and not ``false``/``0``), ``warn`` otherwise."""
    if config.leaks != "auto":
        return config.leaks
    ci = env.get("CI", "").strip().lower()
    return "fail" if ci not in ("", "0", "false", "no") else "warn"
