"""The envelope: round trips, inheritance by real child processes, updates, limits."""

from __future__ import annotations

import ast
import errno
import multiprocessing
import multiprocessing.forkserver
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.errors import RtVarsError, RtVarsMissing
from harness.rtvars import (
    MAX_DEPTH,
    MAX_ENV_STRING,
    RT_VARS_ENV,
    RuntimeVars,
    decode_rtvars,
    dump_rtvars,
    encode_rtvars,
    get_rtvars,
    load_rtvars,
    read_raw_rtvars,
    update_rtvars,
)

pytestmark = pytest.mark.usefixtures("clean_env")

SESSION_RTVARS = RuntimeVars(
    session="tests-trio-tcp-3f9a2c1b",
    spawn_backend="trio",
    tpt_proto="tcp",
    bindspace="/run/user/1000/tractor/tests-trio-tcp-3f9a2c1b",
    diag_on_hang=300.0,
    loglevel="info",
    _registry_addrs=[("127.0.0.1", 24117), ("/run/user/1000/x", "registry@1.sock")],
    _enable_tpts=["tcp", "uds"],
    _root_mailbox=("127.0.0.1", "24117"),
    _debug_mode=True,
)

# What a child prints: the repr of its decoded envelope. The repr of a struct
# shows every field and keeps the difference between tuples and lists, and
# between the int 1616 and the str '1616'.
CHILD_CODE = "from harness.rtvars import load_rtvars; print(repr(load_rtvars()))"


# ---------------------------------------------------------------- strategies

# Lone surrogates cannot be UTF-8 encoded, but repr() escapes them, so they
# belong in the round trip too.
texts = st.text(st.characters(codec=None) | st.characters(categories=["Cs"]))
ints = st.integers(min_value=-(10**40) + 1, max_value=10**40 - 1)
floats = st.floats(allow_nan=False, allow_infinity=False)
addrs = st.tuples(texts, ints | texts)

runtime_vars = st.builds(
    RuntimeVars,
    session=texts,
    spawn_backend=st.none() | texts,
    tpt_proto=st.none() | texts,
    bindspace=st.none() | texts,
    diag_on_hang=st.none() | floats,
    diag_silence=st.none() | floats,
    diag_capture_delay=floats,
    diag_signal=st.none() | texts,
    loglevel=st.none() | texts,
    _registry_addrs=st.lists(addrs, max_size=4),
    _enable_tpts=st.lists(texts, max_size=3),
    _debug_mode=st.booleans(),
    _is_root=st.booleans(),
    _root_mailbox=st.tuples(st.none() | texts, st.none() | ints | texts),
    _root_addrs=st.lists(addrs, max_size=3),
    use_greenback=st.booleans(),
    use_stackscope=st.booleans(),
    _is_infected_aio=st.booleans(),
)

plain_scalars = st.none() | st.booleans() | ints | floats | texts
plain_values = st.recursive(
    plain_scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(texts | ints, inner, max_size=3)
    ),
    max_leaves=8,
)
unknown_keys = texts.filter(lambda key: key not in RuntimeVars.__struct_fields__)


# ---------------------------------------------------------------- round trips


@given(runtime_vars)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_every_field_type_survives_the_round_trip(rtvars: RuntimeVars) -> None:
    decoded = decode_rtvars(encode_rtvars(rtvars))
    assert decoded == rtvars
    # == on lists and tuples already tells them apart; say it for the reader.
    for got, want in zip(decoded._registry_addrs, rtvars._registry_addrs, strict=True):
        assert type(got) is tuple
        assert type(got[1]) is type(want[1])
    assert type(decoded._root_mailbox) is tuple


@given(
    rtvars=runtime_vars, extras=st.dictionaries(unknown_keys, plain_values, max_size=4)
)
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_unknown_keys_survive_update(
    rtvars: RuntimeVars, extras: dict[str, Any]
) -> None:
    env: dict[str, str] = {}
    update_rtvars({**rtvars.to_dict(), **extras}, env)

    update_rtvars({"session": "renamed"}, env)

    raw = read_raw_rtvars(env)
    assert {key: raw[key] for key in extras} == extras
    assert load_rtvars(env) == RuntimeVars(
        **{**msgspec_fields(rtvars), "session": "renamed"}
    )


def msgspec_fields(rtvars: RuntimeVars) -> dict[str, Any]:
    return {field: getattr(rtvars, field) for field in rtvars.__struct_fields__}


@given(
    rtvars=runtime_vars, extras=st.dictionaries(unknown_keys, plain_values, max_size=4)
)
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_everything_dump_writes_takes_the_fast_path(
    rtvars: RuntimeVars, extras: dict[str, Any]
) -> None:
    # The fast path is the only one measured by bench/envelope.py: an
    # envelope the harness wrote must never fall back to the slow checks.
    from harness.rtvars import _REPR_TEXT

    text = encode_rtvars({**rtvars.to_dict(), **extras})
    assert _REPR_TEXT.fullmatch(text), text


def _as_lists(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_as_lists(item) for item in value]
    if isinstance(value, dict):
        return {key: _as_lists(item) for key, item in value.items()}
    return value


def _both_routes(text: str) -> tuple[Any, Any]:
    """Decode *text* the fast way and the exact way: (result or error message)."""
    from harness.rtvars import _decode_plain

    results = []
    for keep_tuples in (False, True):
        try:
            data, rtvars = _decode_plain(
                text, name=RT_VARS_ENV, keep_tuples=keep_tuples
            )
            results.append((_as_lists(data), rtvars))
        except RtVarsError as exc:
            results.append(str(exc))
    return results[0], results[1]


@given(
    rtvars=runtime_vars, extras=st.dictionaries(unknown_keys, plain_values, max_size=4)
)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_the_json_route_decodes_like_literal_eval(
    rtvars: RuntimeVars, extras: dict[str, Any]
) -> None:
    fast, exact = _both_routes(encode_rtvars({**rtvars.to_dict(), **extras}))
    assert fast == exact


@pytest.mark.parametrize(
    "text",
    [
        "{'session': ('s')}",  # (x) is x, not a tuple
        "{'_enable_tpts': ('tcp')}",  # and JSON would make it a list
        "{'_root_mailbox': ()}",
        "{'_registry_addrs': [('h', 1),]}",
        "{'x': {1, 2}}",
        "{'x': {1: 2}}",
        "{'x': ((1, 2), 3)}",
        "{'session': 'a\tb'}",
        "{'session': 'None True (x)'}",
        "{'diag_on_hang': 1e+999}",
        "{'diag_on_hang': 01}",
        "{'session': 's', 'session': 't'}",
        "['a', 1]",
        "'text'",
        "{'x': " + "[" * 33 + "]" * 33 + "}",
        "{'x': " + "[" * 201 + "]" * 201 + "}",
    ],
)
def test_the_json_route_agrees_on_edge_cases(text: str) -> None:
    fast, exact = _both_routes(text)
    assert fast == exact


def test_the_usual_envelope_takes_the_json_route() -> None:
    from harness.rtvars import _parse_as_json

    text = encode_rtvars(SESSION_RTVARS)
    assert _parse_as_json(text) == _as_lists(ast.literal_eval(text))


def test_an_unknown_key_with_a_lone_surrogate_round_trips() -> None:
    text = encode_rtvars({"session": "s", "\udcff": ("\ud800",)})
    assert text == "{'session': 's', '\\udcff': ('\\ud800',)}"
    assert read_raw_rtvars({RT_VARS_ENV: text}) == {
        "session": "s",
        "\udcff": ("\ud800",),
    }
    assert decode_rtvars(text) == RuntimeVars(session="s")


def test_str_and_int_ports_stay_apart() -> None:
    rtvars = RuntimeVars(_registry_addrs=[("127.0.0.1", 1616), ("127.0.0.1", "1616")])
    addrs = decode_rtvars(encode_rtvars(rtvars))._registry_addrs
    assert addrs == [("127.0.0.1", 1616), ("127.0.0.1", "1616")]
    assert [type(port) for _, port in addrs] == [int, str]


def test_the_text_is_repr_of_a_plain_dict_without_defaults() -> None:
    name, value = dump_rtvars(RuntimeVars(session="s", _registry_addrs=[("h", 1)]))
    assert name == RT_VARS_ENV
    assert value == "{'session': 's', '_registry_addrs': [('h', 1)]}"
    assert ast.literal_eval(value) == {"session": "s", "_registry_addrs": [("h", 1)]}
    assert encode_rtvars(RuntimeVars()) == "{}"


def test_nesting_up_to_the_limit_round_trips_and_one_more_is_refused() -> None:
    def nested(levels: int) -> Any:
        value: Any = []
        for _ in range(levels - 1):
            value = [value]
        return value

    # The outer dict is one level.
    deepest = {"extra": nested(MAX_DEPTH - 1)}
    text = encode_rtvars(deepest)
    assert read_raw_rtvars({RT_VARS_ENV: text}) == deepest

    with pytest.raises(RtVarsError, match=f"nested deeper than {MAX_DEPTH} levels"):
        encode_rtvars({"extra": nested(MAX_DEPTH)})
    too_deep = "{'extra': " + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "}"
    with pytest.raises(RtVarsError, match=f"nested deeper than {MAX_DEPTH} levels"):
        decode_rtvars(too_deep)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (float("nan"), "not a finite number"),
        (float("inf"), "not a finite number"),
        (10**40, "more than 40 digits"),
        ({1, 2}, "of type set"),
        (b"bytes", "of type bytes"),
        (os.sep, None),
    ],
)
def test_encode_refuses_what_would_not_decode(value: Any, fragment: str | None) -> None:
    if fragment is None:
        assert read_raw_rtvars({RT_VARS_ENV: encode_rtvars({"x": value})}) == {
            "x": value
        }
        return
    with pytest.raises(RtVarsError, match=fragment):
        encode_rtvars({"x": value})


def test_encode_refuses_subclasses_whose_repr_is_not_a_literal() -> None:
    import enum
    from pathlib import Path

    class Signal(enum.IntEnum):
        USR1 = 10

    # A known field is converted to its declared type; an unknown key cannot be.
    assert encode_rtvars({"_enable_tpts": [Signal.USR1.name]}) == (
        "{'_enable_tpts': ['USR1']}"
    )
    with pytest.raises(RtVarsError, match=r"of type Signal.*with \.value"):
        encode_rtvars({"stack_signal": Signal.USR1})
    with pytest.raises(RtVarsError, match=r"of type PosixPath.*with str\(\)"):
        encode_rtvars({"bindspace_path": Path("/tmp")})


def test_encode_validates_known_fields_by_name() -> None:
    with pytest.raises(RtVarsError, match="_debug_mode"):
        encode_rtvars({"_debug_mode": "yes"})


# ---------------------------------------------------------------- children


def _child_env(rtvars: RuntimeVars) -> dict[str, str]:
    name, value = dump_rtvars(rtvars)
    return {**os.environ, name: value}


def test_a_subprocess_child_decodes_the_same_envelope(python: str) -> None:
    out = subprocess.run(
        [python, "-c", CHILD_CODE],
        env=_child_env(SESSION_RTVARS),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == repr(SESSION_RTVARS)


def _report_envelope(conn: Any) -> None:
    conn.send(repr(load_rtvars()))
    conn.close()


@pytest.fixture
def fresh_forkserver() -> Iterator[None]:
    """A forkserver started by this test, with this test's environment.

    A forkserver's children get the environment the server had when it
    started, not the parent's current one: a server left over from another
    test would hand out another envelope.
    """
    server = multiprocessing.forkserver._forkserver  # type: ignore[attr-defined]
    server._stop()
    yield
    server._stop()


@pytest.fixture
def own_resource_tracker() -> Iterator[None]:
    """Stop the helper process multiprocessing starts, so no process outlives the test.

    spawn and forkserver start a resource tracker on first use; it would live
    as long as pytest and show up in the session's leak check.
    """
    yield
    from multiprocessing import resource_tracker

    resource_tracker._resource_tracker._stop()  # type: ignore[attr-defined]


@pytest.mark.usefixtures("own_resource_tracker")
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_multiprocessing_child_decodes_the_same_envelope(
    method: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    if method == "forkserver":
        request.getfixturevalue("fresh_forkserver")
    name, value = dump_rtvars(SESSION_RTVARS)
    monkeypatch.setenv(name, value)
    context = multiprocessing.get_context(method)
    parent_end, child_end = context.Pipe()
    child = context.Process(target=_report_envelope, args=(child_end,))
    child.start()
    try:
        assert parent_end.poll(60), f"the {method} child sent nothing in 60 s"
        assert parent_end.recv() == repr(SESSION_RTVARS)
    finally:
        child.join(60)
    assert child.exitcode == 0


@pytest.mark.usefixtures("own_resource_tracker", "fresh_forkserver")
def test_a_forkserver_child_sees_the_envelope_of_when_the_server_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Documented behaviour, not a wish: set the envelope before the first
    # forkserver child is started, or its children keep the old one.
    monkeypatch.setenv(*dump_rtvars(RuntimeVars(session="before")))
    context = multiprocessing.get_context("forkserver")
    seen = []
    for session in ("before", "after"):
        update_rtvars({"session": session})
        parent_end, child_end = context.Pipe()
        child = context.Process(target=_report_envelope, args=(child_end,))
        child.start()
        assert parent_end.poll(60)
        seen.append(parent_end.recv())
        child.join(60)
    assert seen == [repr(RuntimeVars(session="before"))] * 2


def test_a_trio_run_process_child_decodes_the_same_envelope(python: str) -> None:
    async def main() -> bytes:
        done = await trio.run_process(
            [python, "-c", CHILD_CODE],
            env=_child_env(SESSION_RTVARS),
            capture_stdout=True,
        )
        return done.stdout  # type: ignore[no-any-return]

    assert trio.run(main).decode().strip() == repr(SESSION_RTVARS)


def test_get_rtvars_reads_a_live_childs_envelope(python: str) -> None:
    # The child waits on stdin, so it is alive while the parent reads it.
    child = subprocess.Popen(
        [python, "-c", "import sys; print('ready', flush=True); sys.stdin.read()"],
        env=_child_env(SESSION_RTVARS),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        assert get_rtvars(psutil.Process(child.pid)) == SESSION_RTVARS
    finally:
        child.communicate("", timeout=60)
    assert child.returncode == 0


def test_get_rtvars_of_a_child_without_an_envelope(python: str) -> None:
    child = subprocess.Popen(
        [python, "-c", "import sys; print('ready', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        child.stdout.readline()
        proc = psutil.Process(child.pid)
        with pytest.raises(RtVarsMissing):
            get_rtvars(proc)
        assert get_rtvars(proc, missing_ok=True) == RuntimeVars()
    finally:
        child.communicate("", timeout=60)


def test_get_rtvars_without_a_process_reads_this_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(*dump_rtvars(SESSION_RTVARS))
    assert get_rtvars() == SESSION_RTVARS


# ---------------------------------------------------------------- updates


def test_update_writes_into_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(*dump_rtvars(SESSION_RTVARS))
    name, value = update_rtvars({"loglevel": "debug"})
    assert os.environ[name] == value
    assert load_rtvars() == RuntimeVars(
        **{**msgspec_fields(SESSION_RTVARS), "loglevel": "debug"}
    )


def test_update_writes_into_a_given_dict_and_not_os_environ(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(*dump_rtvars(RuntimeVars(session="outer")))
    env = {RT_VARS_ENV: encode_rtvars(RuntimeVars(session="inner", loglevel="info"))}

    update_rtvars({"_debug_mode": True}, env)

    assert load_rtvars(env) == RuntimeVars(
        session="inner", loglevel="info", _debug_mode=True
    )
    assert load_rtvars() == RuntimeVars(session="outer")


def test_update_false_writes_nowhere_and_returns_the_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = encode_rtvars(RuntimeVars(session="s"))
    monkeypatch.setenv(RT_VARS_ENV, before)

    name, value = update_rtvars({"loglevel": "warning"}, False)

    assert os.environ[RT_VARS_ENV] == before
    assert decode_rtvars(value) == RuntimeVars(session="s", loglevel="warning")
    assert name == RT_VARS_ENV


def test_update_into_an_empty_env_starts_from_defaults() -> None:
    env: dict[str, str] = {}
    update_rtvars({"session": "new"}, env)
    assert env == {RT_VARS_ENV: "{'session': 'new'}"}


def test_update_with_a_struct_sets_every_field_defaults_included() -> None:
    env = {RT_VARS_ENV: encode_rtvars({"_debug_mode": True, "later": [1, (2, 3)]})}
    update_rtvars(RuntimeVars(session="s"), env)
    assert read_raw_rtvars(env) == {"session": "s", "later": [1, (2, 3)]}


def test_update_with_a_dict_keeps_fields_it_does_not_name() -> None:
    env = {RT_VARS_ENV: encode_rtvars({"_debug_mode": True, "later": "kept"})}
    update_rtvars({"session": "s"}, env)
    assert read_raw_rtvars(env) == {
        "session": "s",
        "_debug_mode": True,
        "later": "kept",
    }


def test_update_refuses_a_malformed_current_envelope_and_writes_nothing() -> None:
    env = {RT_VARS_ENV: "{'session': 'cut"}
    with pytest.raises(RtVarsError, match="truncated"):
        update_rtvars({"session": "s"}, env)
    assert env == {RT_VARS_ENV: "{'session': 'cut"}


def test_as_kwargs_gives_what_open_root_actor_takes() -> None:
    assert SESSION_RTVARS.as_kwargs() == {
        "registry_addrs": [
            ("127.0.0.1", 24117),
            ("/run/user/1000/x", "registry@1.sock"),
        ],
        "enable_transports": ["tcp", "uds"],
        "debug_mode": True,
        "loglevel": "info",
    }


def test_as_kwargs_falls_back_on_the_sessions_transport() -> None:
    kwargs = RuntimeVars(tpt_proto="uds").as_kwargs()
    assert kwargs["enable_transports"] == ["uds"]
    assert kwargs["registry_addrs"] == []
    assert kwargs["debug_mode"] is False
    assert kwargs["loglevel"] is None


# ---------------------------------------------------------------- loading


def test_load_missing_ok_gives_defaults() -> None:
    assert load_rtvars({}, missing_ok=True) == RuntimeVars()
    assert load_rtvars(missing_ok=True) == RuntimeVars()


def test_load_without_missing_ok_raises_rtvars_missing() -> None:
    with pytest.raises(RtVarsMissing, match="harness exec"):
        load_rtvars({})
    with pytest.raises(RtVarsMissing):
        load_rtvars()


def test_a_malformed_envelope_raises_even_with_missing_ok() -> None:
    with pytest.raises(RtVarsError):
        load_rtvars({RT_VARS_ENV: "{'session': 1}"}, missing_ok=True)


def test_load_reads_another_variable_name() -> None:
    env = {"MY_VARS": "{'session': 's'}"}
    assert load_rtvars(env, name="MY_VARS") == RuntimeVars(session="s")
    with pytest.raises(RtVarsMissing, match="MY_VARS"):
        load_rtvars({RT_VARS_ENV: "{}"}, name="MY_VARS")


def test_hand_written_envelopes_decode() -> None:
    text = """ {"session": "s",
                "_registry_addrs": [["127.0.0.1", 1616]],   # a comment
                "_enable_tpts": ("tcp",)}\n"""
    assert decode_rtvars(text) == RuntimeVars(
        session="s", _registry_addrs=[("127.0.0.1", 1616)], _enable_tpts=["tcp"]
    )


# ---------------------------------------------------------------- size limit


def _envelope_of_total_size(total: int) -> RuntimeVars:
    """An envelope whose ``NAME=value`` plus its NUL is *total* bytes."""
    overhead = len(RT_VARS_ENV) + 1 + len(encode_rtvars(RuntimeVars(session="x"))) + 1
    return RuntimeVars(session="x" * (total - overhead + 1))


def test_dump_refuses_an_envelope_over_the_limit() -> None:
    too_big = _envelope_of_total_size(MAX_ENV_STRING + 1)
    with pytest.raises(RtVarsError, match="131,072 bytes with its name"):
        dump_rtvars(too_big)
    with pytest.raises(RtVarsError, match="131,072 bytes with its name"):
        decode_rtvars(repr(too_big.to_dict()))


def test_an_envelope_at_the_limit_passes_exec(python: str) -> None:
    name, value = dump_rtvars(_envelope_of_total_size(MAX_ENV_STRING))
    assert len(name) + 1 + len(value.encode()) + 1 == MAX_ENV_STRING
    out = subprocess.run(
        [python, "-c", f"import os; print(len(os.environ[{name!r}]))"],
        env={**os.environ, name: value},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert int(out) == len(value)


@pytest.mark.skipif(sys.platform != "linux", reason="MAX_ARG_STRLEN is Linux's")
def test_the_kernel_refuses_one_byte_more(python: str) -> None:
    # The limit is the kernel's, not a guess: the same string one byte longer,
    # set without dump_rtvars, makes exec fail with E2BIG.
    value = "x" * (MAX_ENV_STRING - len(RT_VARS_ENV) - 1)
    with pytest.raises(OSError, match="Argument list too long") as caught:
        subprocess.run(
            [python, "-c", "pass"], env={**os.environ, RT_VARS_ENV: value}, check=True
        )
    assert caught.value.errno == errno.E2BIG


@pytest.mark.skipif(sys.platform != "linux", reason="MAX_ARG_STRLEN is Linux's")
def test_the_limit_matches_this_kernels_page_size() -> None:
    # MAX_ARG_STRLEN is 32 pages.
    assert os.sysconf("SC_PAGE_SIZE") * 32 == MAX_ENV_STRING
