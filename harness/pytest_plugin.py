"""The harness's pytest plugin: the envelope as fixtures, and a session for
bare ``pytest`` runs.

Loaded through the ``pytest11`` entry point; ``-p no:harness`` turns it off.

Inside a harness session (``harness exec``, the nox sessions) it reads the
envelope at start-up and serves it as fixtures: `rtvars`, `bindspace` and
`session_id`, and `reg_addr`, `spawn_backend` and `tpt_proto` unless
another plugin (tractor's) already serves those (see
`harness.pytest_fixtures`).

Without an envelope, plain ``pytest`` opens a session of its own, owned by
the pytest process: it exports the envelope into ``os.environ`` so every
child inherits it, and at the end checks for leaks and shows them in the
terminal summary (warn only: nothing is killed, the exit status stands).
Unlike ``harness exec`` it leaves ``XDG_RUNTIME_DIR`` alone: the run's
modules have already computed their socket folders from it.
``--harness-session=no`` (or the ini option ``harness_session = no``) turns
that off.

``--spawn-backend`` and ``--tpt-proto``: tractor's own pytest plugin defines
them, as may a project's conftest.py. This plugin adds them only when nobody
else has, after the initial conftests are loaded, so neither side crashes
with a duplicate option. When either flag is given on the command line (or
in ``addopts``), the envelope is updated so that every child sees the value
the flag set.

The plugin also registers `faulthandler` stack dumps on the envelope's
``diag_signal`` (default ``SIGUSR2``, clear of tractor's ``SIGUSR1``;
``--harness-diag-signal`` overrides it) into ``<bindspace>/stacks/``.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pytest

from harness.errors import HarnessError
from harness.rtvars import RT_VARS_ENV, RuntimeVars, load_rtvars, update_rtvars

if TYPE_CHECKING:
    from harness.leaks import LeakReport
    from harness.session import Session

log = logging.getLogger("harness.pytest_plugin")

#: The flags that select a cell of the matrix: (option, envelope field,
#: default when neither the flag nor the envelope says).
FLAGS: Final = (
    ("--spawn-backend", "spawn_backend", "trio"),
    ("--tpt-proto", "tpt_proto", "tcp"),
)


@dataclass
class PluginState:
    """What the plugin decided at start-up, kept on the config's stash."""

    envelope_name: str = RT_VARS_ENV
    bindspace_folder: str = "tractor"
    args: list[str] = field(default_factory=list)
    """The full argument list (addopts included), to tell given flags apart
    from defaults."""
    own_flags: list[str] = field(default_factory=list)
    """The flags this plugin defined itself (nobody else had)."""
    values: dict[str, str] = field(default_factory=dict)
    """The resolved ``spawn_backend`` and ``tpt_proto``."""
    session: Session | None = None
    """The session this pytest process opened and owns (standalone only)."""
    saved_env: dict[str, str | None] = field(default_factory=dict)
    """Environment variables as they were before the plugin changed them."""
    leaks: LeakReport | None = None
    leak_text: str = ""
    stacks_file: Path | None = None


STATE_KEY = pytest.StashKey[PluginState]()


# ---------------------------------------------------------------- options


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("harness", "harness (isolated, leak-checked sessions)")
    group.addoption(
        "--harness-session",
        choices=("auto", "no"),
        default=None,
        help="auto (default): without an envelope, open a harness session "
        "for this run (private bindspace, registry port lease, leak check "
        "at the end); no: never",
    )
    group.addoption(
        "--harness-diag-signal",
        default=None,
        metavar="SIGNAL",
        help="signal on which every process dumps its stacks into "
        "<bindspace>/stacks/ (default: the envelope's diag_signal, else "
        "SIGUSR2)",
    )
    parser.addini(
        "harness_session",
        "auto or no: whether a bare pytest run opens its own harness session",
        default="auto",
    )


@pytest.hookimpl(wrapper=True)
def pytest_load_initial_conftests(
    early_config: pytest.Config, parser: pytest.Parser, args: list[str]
) -> Iterator[None]:
    # Entry-point plugins add their options before the rootdir's conftest.py
    # is imported; adding --spawn-backend there would make a conftest that
    # defines it fail. Here the initial conftests (and -p plugins) have
    # added theirs, and the command line is not fully parsed yet.
    result = yield
    state = PluginState(args=list(args))
    for option, dest, _default in FLAGS:
        if _add_flag(parser, option, dest):
            state.own_flags.append(option)
    early_config.stash[STATE_KEY] = state
    return result


def _add_flag(parser: pytest.Parser, option: str, dest: str) -> bool:
    what = "spawn backend" if dest == "spawn_backend" else "transport"
    try:
        parser.getgroup("harness").addoption(
            option,
            dest=dest,
            default=None,
            help=f"the {what} of this run (default: the envelope's, else "
            f"{dict((o, d) for o, _, d in FLAGS)[option]}); written into the "
            "envelope so children see it",
        )
    except (ValueError, argparse.ArgumentError):
        return False
    return True


def _given(args: Sequence[str], option: str) -> bool:
    """Whether *option* appears in *args* (``--opt V`` or ``--opt=V``)."""
    return any(a == option or a.startswith(option + "=") for a in args)


# ------------------------------------------------------------- start-up


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    state = config.stash.get(STATE_KEY, None)
    if state is None:
        # pytest_load_initial_conftests did not run (pytest called in a way
        # that skips it); the options other plugins define still work.
        state = PluginState(args=list(config.invocation_params.args))
        config.stash[STATE_KEY] = state
    _read_project_settings(config, state)

    present = state.envelope_name in os.environ
    mode = config.getoption("harness_session") or config.getini("harness_session")
    if mode not in ("auto", "no"):
        msg = f"harness_session = {mode!r} is invalid; use auto or no"
        raise pytest.UsageError(msg)

    try:
        flags = _flag_values(config, state)
        if (
            not present
            and mode == "auto"
            and not _is_xdist_worker(config)
            and not _only_informs(config)
        ):
            _open_standalone(config, state, flags)
        elif present:
            _apply_flags(state, flags)
        envelope = load_rtvars(missing_ok=True, name=state.envelope_name)
    except HarnessError as exc:
        raise pytest.UsageError(f"harness: {exc}") from None

    for _option, dest, default in FLAGS:
        state.values[dest] = flags.get(dest) or getattr(envelope, dest) or default
    _enable_stack_dumps(config, state, envelope)


def _read_project_settings(config: pytest.Config, state: PluginState) -> None:
    # The envelope variable and the bindspace folder come from the project's
    # [tool.harness], so that bare pytest and the nox sessions agree.
    pyproject = config.rootpath / "pyproject.toml"
    if not pyproject.is_file():
        return
    from harness.config import load_config

    try:
        settings = load_config(pyproject)
    except HarnessError as exc:
        raise pytest.UsageError(f"harness: {exc}") from None
    state.envelope_name = settings.envelope_name
    state.bindspace_folder = settings.bindspace_name


def _flag_values(config: pytest.Config, state: PluginState) -> dict[str, str]:
    """The flags given on the command line or in addopts, by envelope field."""
    given: dict[str, str] = {}
    for option, dest, _default in FLAGS:
        value = _option_value(config, option)
        if value is not None and (
            option in state.own_flags or _given(state.args, option)
        ):
            given[dest] = value
    return given


def _option_value(config: pytest.Config, option: str) -> str | None:
    """*option*'s value as one string, whoever defined it.

    tractor's plugin defines ``--tpt-proto`` with ``nargs='+'`` (a list, of
    which its suite supports one); a session has one transport, the first.
    """
    value = config.getoption(option, default=None)
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    if value is None:
        return None
    return str(value).strip("'\"")


def _apply_flags(state: PluginState, flags: dict[str, str]) -> None:
    """Write flags given on the command line into the inherited envelope."""
    if not flags:
        return
    current = load_rtvars(name=state.envelope_name)
    changes: dict[str, Any] = {
        k: v for k, v in flags.items() if getattr(current, k) != v
    }
    if "tpt_proto" in changes:
        # A process joins over the transports it enables; keep the ones the
        # envelope had, so the registry address stays reachable.
        tpts = [changes["tpt_proto"], *current._enable_tpts]
        changes["_enable_tpts"] = list(dict.fromkeys(tpts))
    if not changes:
        return
    _save_env(state, state.envelope_name)
    update_rtvars(changes, name=state.envelope_name)
    log.info("Updated the envelope from the command line: %s.", sorted(changes))


def _is_xdist_worker(config: pytest.Config) -> bool:
    # pytest-xdist's workers inherit the controller's envelope; this is for
    # the unusual worker started without it.
    return hasattr(config, "workerinput")


def _only_informs(config: pytest.Config) -> bool:
    """``--help``, ``--version`` and friends run no test: no session."""
    option = config.option
    return bool(
        getattr(option, "help", False)
        or getattr(option, "version", False)
        or getattr(option, "showfixtures", False)
        or getattr(option, "markers", False)
    )


def _open_standalone(
    config: pytest.Config, state: PluginState, flags: dict[str, str]
) -> None:
    from harness.session import Session

    defaults = {dest: default for _o, dest, default in FLAGS}
    backend = flags.get("spawn_backend") or _option_default(config, "--spawn-backend")
    transport = flags.get("tpt_proto") or _option_default(config, "--tpt-proto")
    session = Session(
        f"pytest-{config.rootpath.name}",
        backend=backend or defaults["spawn_backend"],
        transport=transport or defaults["tpt_proto"],
        command=[sys.executable, "-m", "pytest", *config.invocation_params.args],
        bindspace_folder=state.bindspace_folder,
        envelope_name=state.envelope_name,
    )
    session.open()
    state.session = session
    for name, value in session.env(base={}).items():
        # XDG_RUNTIME_DIR is left alone: the target (tractor, through
        # platformdirs) computed its socket folder when it was imported,
        # before this hook; changing it now would split the run between two
        # folders, the parent's and its children's. `harness exec` sets it
        # before the process starts, where it is safe.
        if name in _NOT_EXPORTED_IN_PROCESS:
            continue
        _save_env(state, name)
        os.environ[name] = value
    log.info("Opened harness session %s for this pytest run.", session.id)


#: Variables of the session environment a running pytest must not change.
_NOT_EXPORTED_IN_PROCESS: Final = frozenset({"XDG_RUNTIME_DIR", "XDG_CACHE_HOME"})


def _option_default(config: pytest.Config, option: str) -> str | None:
    # Another plugin's flag (tractor's) has its own default; it is what the
    # run uses when the flag is not given, so the session agrees with it.
    return _option_value(config, option)


def _save_env(state: PluginState, name: str) -> None:
    if name not in state.saved_env:
        state.saved_env[name] = os.environ.get(name)


def _enable_stack_dumps(
    config: pytest.Config, state: PluginState, envelope: RuntimeVars
) -> None:
    try:
        from harness import faulthandler_hook
    except ImportError:  # an older harness without it: nothing to register
        return
    signame = config.getoption("harness_diag_signal")
    try:
        signum = faulthandler_hook.resolve_signal(signame) if signame else None
        state.stacks_file = faulthandler_hook.enable(envelope, signum=signum)
    except HarnessError as exc:
        raise pytest.UsageError(f"harness: {exc}") from None


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    # Every plugin is registered by now (conftest files come later and
    # override plugin fixtures anyway): serve the tractor-named fixtures
    # only if no other plugin does.
    from harness import pytest_fixtures

    manager = session.config.pluginmanager
    if manager.has_plugin("harness-fixtures"):
        return
    taken = [name for name in pytest_fixtures.NAMES if _fixture_exists(session, name)]
    if taken:
        log.debug("Other plugins serve %s; the harness leaves them be.", taken)
        return
    manager.register(pytest_fixtures, "harness-fixtures")


def _fixture_exists(session: pytest.Session, name: str) -> bool:
    manager = getattr(session, "_fixturemanager", None)
    if manager is None:
        return False
    try:
        return bool(manager.getfixturedefs(name, session))
    except (TypeError, AttributeError):  # a pytest whose lookup differs
        return False


# --------------------------------------------------------------- reporting


def pytest_report_header(config: pytest.Config) -> list[str]:
    state = config.stash.get(STATE_KEY, None)
    if state is None:
        return []
    envelope = load_rtvars(missing_ok=True, name=state.envelope_name)
    values = ", ".join(f"{k}={v}" for k, v in state.values.items())
    if not envelope.session:
        return [f"harness: no envelope ({state.envelope_name} unset); {values}"]
    how = "opened by this pytest" if state.session is not None else "inherited"
    registry = envelope._registry_addrs[0] if envelope._registry_addrs else None
    return [
        f"harness: session {envelope.session} ({how}); {values}",
        f"harness: registry {registry!r}, bindspace {envelope.bindspace}",
    ]


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    state = session.config.stash.get(STATE_KEY, None)
    if state is None or state.session is None or not state.session.is_open:
        return
    try:
        from harness.leak_report import make_console, render_report
        from harness.leaks import check_leaks
    except ImportError:  # an older harness: close() counts socket files
        return
    state.leaks = check_leaks(
        state.session.record, exclude_pids=_multiprocessing_helpers()
    )
    buffer = io.StringIO()
    console = make_console(buffer)
    render_report(state.leaks, console)
    state.leak_text = buffer.getvalue()


def _multiprocessing_helpers() -> list[int]:
    """Pids of this process's multiprocessing forkserver and resource tracker.

    They are started on first use and end when this process exits, after
    the leak check: they are the run's machinery, not leaks.
    """
    pids: list[int] = []
    forkserver = sys.modules.get("multiprocessing.forkserver")
    tracker = sys.modules.get("multiprocessing.resource_tracker")
    for module, holder, attr in (
        (forkserver, "_forkserver", "_forkserver_pid"),
        (tracker, "_resource_tracker", "_pid"),
    ):
        pid = getattr(getattr(module, holder, None), attr, None)
        if isinstance(pid, int) and pid > 0:
            pids.append(pid)
    return pids


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    state = config.stash.get(STATE_KEY, None)
    if state is None or state.session is None:
        return
    leaked = state.leaks is not None and state.leaks.leak_count > 0
    terminalreporter.section(
        "harness leak check", sep="=", red=leaked, green=not leaked, bold=True
    )
    if state.leak_text:
        terminalreporter.write(state.leak_text)
    else:
        terminalreporter.write_line(
            f"Session {state.session.id}: the leak check is not available in "
            "this version of the harness; only socket files left in the "
            "bindspace are counted when the session closes."
        )


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(STATE_KEY, None)
    if state is None:
        return
    try:
        if state.session is not None:
            state.session.close(leaks=state.leaks)
    finally:
        # Put the environment back: an in-process run (pytester) must not
        # leave its envelope to the process that started it.
        for name, value in state.saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        state.saved_env.clear()


# ---------------------------------------------------------------- fixtures


def _state(request: pytest.FixtureRequest) -> PluginState:
    state = request.config.stash.get(STATE_KEY, None)
    if state is None:
        msg = "the harness plugin did not start up (was it disabled?)"
        raise HarnessError(msg)
    return state


@pytest.fixture(scope="session")
def rtvars(request: pytest.FixtureRequest) -> RuntimeVars:
    """The envelope of this run, typed (`harness.rtvars.RuntimeVars`)."""
    state = _state(request)
    return load_rtvars(missing_ok=True, name=state.envelope_name)


@pytest.fixture(scope="session")
def session_id(rtvars: RuntimeVars) -> str:
    """The harness session id; fails the test outside a session."""
    if not rtvars.session:
        pytest.fail(
            "no harness session: the envelope is missing. Run under "
            "`harness exec -- pytest ...` or drop --harness-session=no",
            pytrace=False,
        )
    return rtvars.session


@pytest.fixture(scope="session")
def bindspace(rtvars: RuntimeVars, session_id: str) -> Path:
    """The session's private folder for socket files."""
    if not rtvars.bindspace:
        pytest.fail(
            f"the envelope of session {session_id!r} has no bindspace",
            pytrace=False,
        )
    return Path(rtvars.bindspace)
