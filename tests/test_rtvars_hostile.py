"""Hostile and broken envelopes: each is an `RtVarsError`, never code, never a crash.

Every input that looks like code tries to create a marker file; the tests
check that the file never appears. The whole table is also decoded in a child
process with a raised recursion limit, so that input able to drive the parser
or the checks deep would crash the child (a C stack overflow) instead of
raising a polite RecursionError, and the test would see the crash.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.errors import RtVarsError
from harness.rtvars import (
    RT_VARS_ENV,
    RuntimeVars,
    _decode_plain,
    decode_rtvars,
    encode_rtvars,
    get_rtvars,
    load_rtvars,
)

MARKER = "{marker}"
TOUCH = f"__import__('os').system('touch {MARKER}')"


@dataclass(frozen=True)
class Hostile:
    id: str
    text: str
    fragment: str
    """A part of the error message that tells the user what is wrong."""


HOSTILE = [
    # Code: every entry would create the marker file if it were ever run.
    Hostile("import-system", TOUCH, "the name '__import__'"),
    Hostile(
        "code-in-a-field", "{'session': " + TOUCH + "}", "the name '__import__' (code"
    ),
    Hostile("lambda", "{'session': (lambda: " + TOUCH + ")()}", "the name 'lambda'"),
    Hostile("attribute", "{'session': ''.join(" + TOUCH + ")}", "the name 'join'"),
    Hostile("f-string", "{'session': f'{" + TOUCH + "}'}", "an f-string"),
    Hostile("call", "{'session': exec(\"" + TOUCH + '")}', "the name 'exec'"),
    Hostile(
        "comprehension",
        "{'_enable_tpts': [" + TOUCH + " for _ in 'x']}",
        "the name '__import__'",
    ),
    Hostile("walrus", "{'session': (x := " + TOUCH + ")}", "the name 'x'"),
    Hostile("set-call", "{'_enable_tpts': set()}", "the name 'set'"),
    Hostile(
        "call-chain",
        "{'session': ''" + "()" * 40_000 + "}",
        "a call or a subscript at character 15",
    ),
    Hostile(
        "subscript-chain",
        "{'session': 'x'" + "[0]" * 30_000 + "}",
        "a call or a subscript",
    ),
    Hostile("binary-chain", "{'session': " + "-1" * 40_000 + "}", "the operator '-'"),
    Hostile(
        "unary-run", "{'session': " + "-" * 100_000 + "1}", "a run of sign operators"
    ),
    Hostile("not-chain", "{'session': " + "not " * 30_000 + "1}", "the name 'not'"),
    # Quotes that never close, tens of thousands of times: was quadratic.
    Hostile("unclosed-quotes", "'" + "\\'" * 60_000, "unterminated string"),
    # Size, depth and number bounds.
    Hostile("100k-brackets", "[" * 100_000 + "]" * 100_000, "200,000 bytes"),
    Hostile(
        "deep-brackets-within-size",
        "{'x': " + "[" * 60_000 + "]" * 60_000 + "}",
        "nests deeper than 32 brackets",
    ),
    Hostile(
        "deep-but-parsable",
        "{'x': " + "[" * 100 + "]" * 100 + "}",
        "nested deeper than 32",
    ),
    Hostile(
        "10MB-value", "{'session': '" + "x" * 10_000_000 + "'}", "10,000,015 bytes"
    ),
    Hostile("5000-digit-int", "{'x': " + "9" * 5_000 + "}", "a number of 5,000 digits"),
    Hostile("huge-float", "{'diag_on_hang': 1e999}", "not a finite number"),
    # Broken or of the wrong shape.
    Hostile(
        "truncated",
        "{'session': 'abc', '_registry_addrs': [('127.0.0.1', 16",
        "truncated",
    ),
    Hostile("truncated-string", "{'session': 'ab", "unterminated string"),
    Hostile(
        "indented-double-comma",
        "\n\n   {'session': 'x',, }",
        "invalid syntax at line 3, column 20",
    ),
    Hostile(
        "wrong-field-type",
        "{'_debug_mode': 'yes'}",
        "Expected `bool`, got `str` - at `_debug_mode`",
    ),
    Hostile(
        "bool-as-port",
        "{'_registry_addrs': [('h', True)]}",
        "at `_registry_addrs[0][1]`",
    ),
    Hostile(
        "none-for-a-list", "{'_registry_addrs': None}", "Expected `array`, got `null`"
    ),
    Hostile(
        "bare-list",
        "[('127.0.0.1', 1616)]",
        "must encode a dict of runtime vars, got a list",
    ),
    Hostile("non-string-key", "{1: 'tcp'}", "a key that is not a str: 1"),
    Hostile("empty", "", "set but empty"),
    Hostile("only-spaces", "  \n ", "set but empty"),
    Hostile("nul-byte", "{'session': 'a\0b'}", "a NUL character at character 15"),
    Hostile("lone-surrogate", "{'session': '\ud800'}", "the lone surrogate '\\ud800'"),
    Hostile(
        "undecodable-byte", "{'session': '\udcff'}", "the byte 0xFF, which is not UTF-8"
    ),
    Hostile("set-literal", "{'x': {1, 2}}", "of type set"),
    Hostile("bytes-literal", "{'session': b'x'}", "Expected `str`, got `bytes`"),
    Hostile("complex", "{'x': 1+2j}", "the operator '+'"),
    Hostile("ellipsis", "{'x': ...}", "the operator '.'"),
    Hostile("invalid-escape", "{'session': 'C:\\q'}", "invalid escape sequence"),
    Hostile("octal-escape", "{'session': '\\555'}", "invalid octal escape sequence"),
    Hostile("non-ascii-name", "{'x': ℘}", "the character '℘' outside a string"),
]


def _text(case: Hostile, marker: Path) -> str:
    return case.text.replace(MARKER, str(marker))


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("case", HOSTILE, ids=[case.id for case in HOSTILE])
def test_hostile_input_is_a_clear_rtvars_error(case: Hostile, tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    with pytest.raises(RtVarsError) as caught:
        decode_rtvars(_text(case, marker))
    assert isinstance(caught.value, ValueError)
    assert case.fragment in str(caught.value)
    assert str(caught.value).startswith(RT_VARS_ENV)
    assert not marker.exists(), "the envelope ran code"


def test_the_table_is_big_enough() -> None:
    assert len(HOSTILE) >= 20
    assert sum(MARKER in case.text for case in HOSTILE) >= 8


def test_the_marker_would_be_created_if_the_text_were_code(tmp_path: Path) -> None:
    # Proof that the marker check above can fail: the same text, evaluated.
    marker = tmp_path / "MARKER"
    eval(TOUCH.replace(MARKER, str(marker)))
    assert marker.exists()


CHILD = """
import json, sys
sys.setrecursionlimit(1_000_000)
from harness.errors import RtVarsError
from harness.rtvars import decode_rtvars
for case_id, text in json.loads(sys.stdin.read()):
    print(case_id, flush=True)
    try:
        decode_rtvars(text)
    except RtVarsError:
        continue
    print("decoded:", case_id, flush=True)
    sys.exit(3)
print("all refused", flush=True)
"""


def test_hostile_input_cannot_crash_a_child_process(
    python: str, tmp_path: Path
) -> None:
    marker = tmp_path / "MARKER"
    cases = [(case.id, _text(case, marker)) for case in HOSTILE]
    done = subprocess.run(
        [python, "-c", CHILD],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    last = done.stdout.strip().splitlines()[-1:] or ["<nothing>"]
    assert done.returncode == 0, (
        f"the child ended with status {done.returncode} after {last[0]!r}: "
        f"{done.stderr[-2000:]}"
    )
    assert last == ["all refused"]
    assert not marker.exists()


def test_non_utf8_bytes_in_a_live_processes_environ(python: str) -> None:
    good = encode_rtvars(RuntimeVars(session="ok")).encode()
    bad = b"{'session': 'caf\xe9 \xff'}"
    child = subprocess.Popen(
        [python, "-c", "import sys; print('ready', flush=True); sys.stdin.read()"],
        env={b"PATH": b"/usr/bin:/bin", RT_VARS_ENV.encode(): bad, b"GOOD": good},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"ready"
        proc = psutil.Process(child.pid)
        with pytest.raises(
            RtVarsError, match=r"the byte 0xE9, which is not UTF-8, at character 17"
        ):
            get_rtvars(proc)
        # The same process's other variables are still readable.
        assert get_rtvars(proc, name="GOOD") == RuntimeVars(session="ok")
    finally:
        child.communicate(b"", timeout=60)


# ---------------------------------------------------------------- fuzzing

VALID = encode_rtvars(
    RuntimeVars(
        session="tests-trio-tcp-3f9a2c1b",
        tpt_proto="tcp",
        diag_on_hang=300.0,
        _registry_addrs=[("127.0.0.1", 24117)],
        _enable_tpts=["tcp"],
        _root_mailbox=("127.0.0.1", 24117),
    )
)
PIECES = [
    *"()[]{}'\",:-+.\\#\n\0 ",
    "not ",
    "lambda:",
    "x",
    "1e999",
    "9" * 50,
    "\udcff",
]


@st.composite
def mutated_envelopes(draw: st.DrawFn) -> str:
    text = VALID
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(text)))
        action = draw(st.sampled_from(["insert", "delete", "replace", "repeat"]))
        piece = draw(st.sampled_from(PIECES) | st.text(max_size=3))
        if action == "insert":
            text = text[:at] + piece + text[at:]
        elif action == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 20)) :]
        elif action == "replace":
            text = text[:at] + piece + text[at + len(piece) :]
        else:
            text = text[:at] + piece * draw(st.integers(2, 2_000)) + text[at:]
    return text


def _as_lists(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_as_lists(item) for item in value]
    if isinstance(value, dict):
        return {key: _as_lists(item) for key, item in value.items()}
    return value


def _only_rtvars_errors(text: str) -> None:
    # Anything but an RtVarsError escapes and fails the test; and the fast
    # (JSON) and exact (literal_eval) ways of reading must agree.
    results = []
    for keep_tuples in (False, True):
        try:
            data, rtvars = _decode_plain(
                text, name=RT_VARS_ENV, keep_tuples=keep_tuples
            )
            results.append((_as_lists(data), rtvars))
        except RtVarsError as exc:
            results.append(str(exc))
    assert results[0] == results[1]
    with contextlib.suppress(RtVarsError):
        load_rtvars({RT_VARS_ENV: text})


@pytest.mark.slow
@pytest.mark.filterwarnings("error")
@given(st.text() | st.lists(st.sampled_from(PIECES), max_size=200).map("".join))
@settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzz_arbitrary_text_raises_nothing_but_rtvars_error(text: str) -> None:
    _only_rtvars_errors(text)


@pytest.mark.slow
@pytest.mark.filterwarnings("error")
@given(mutated_envelopes())
@settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzz_mutated_envelopes_raise_nothing_but_rtvars_error(text: str) -> None:
    _only_rtvars_errors(text)
