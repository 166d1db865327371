"""The envelope: a typed `RuntimeVars` carried in one environment variable.

The value of ``_TRACTOR_RT_VARS`` is the ``repr`` of a plain dict of builtins
(``str``, ``int``, ``float``, ``bool``, ``None``, ``list``, ``tuple``,
``dict``). It is decoded as a Python literal, never executed (with
`ast.literal_eval`, or for the usual envelope an equivalent and faster JSON
reading, see "Decoding" below) and hydrated with `msgspec.convert`, so tuples
survive the trip, the text stays readable in ``/proc/<pid>/environ`` and a
wrong type is an error that names the field.

Because every child process inherits its parent's environment, one envelope
set by the harness reaches every process of a session, including scripts the
tests start as plain subprocesses and orphans re-parented to init.

Unknown keys: a reader ignores keys it does not know (a newer writer may add
fields), and `update_rtvars` keeps them when it re-encodes, so an older
process in the middle of a tree never strips what a newer one added.

Hostile text: the envelope is read from environments the harness does not
control (``/proc/<pid>/environ`` of any process on the host), so decoding is
bounded before any parser sees the text. Nothing is ever executed, and no
input can make the decoder recurse deeply, run for long or allocate more than
a small multiple of the text; every rejection is an `RtVarsError` that says
what is wrong and where.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Final

import msgspec

from harness.errors import RtVarsError, RtVarsMissing

if TYPE_CHECKING:
    import psutil

log = logging.getLogger("harness.rtvars")

#: The environment variable that carries the envelope.
RT_VARS_ENV: Final = "_TRACTOR_RT_VARS"

#: Linux refuses at ``exec`` time, with ``E2BIG``, an environment string
#: ``NAME=value`` whose length with its terminating NUL exceeds 128 KiB
#: (``MAX_ARG_STRLEN``); refusing earlier, in `dump_rtvars`, gives a message
#: that names the envelope instead.
MAX_ENV_STRING: Final = 128 * 1024

#: Deepest nesting of containers accepted, the outer dict counting as one.
#: Real envelopes nest three deep (dict -> list -> tuple); the bound keeps the
#: parser and the checks far from any recursion limit.
MAX_DEPTH: Final = 32

#: Longest run of digits accepted in one number: a port, a pid or a time fits
#: easily, and int parsing stays linear.
MAX_DIGITS: Final = 40

Addr = tuple[str, int | str]


class RuntimeVars(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What a process needs to join its session, and what identifies it.

    The underscore fields mirror tractor's own runtime vars by name, so the
    same dict can seed tractor's state; the others are the harness's own. All
    fields have defaults, so an empty envelope (``{}``) is valid.
    """

    # The harness's own fields.
    session: str = ""
    """The session id, e.g. ``tests-trio-tcp-3f9a2c1b``; empty outside one."""
    spawn_backend: str | None = None
    """tractor's spawn backend: ``trio``, ``mp_spawn`` or ``mp_forkserver``."""
    tpt_proto: str | None = None
    """The transport of the session: ``tcp`` or ``uds``."""
    bindspace: str | None = None
    """Absolute path of the session's private directory for socket files."""
    diag_on_hang: float | None = None
    """Wall-clock limit of the session in seconds; ``None`` for no limit."""
    diag_silence: float | None = None
    """Seconds without output after which the session counts as hung."""
    diag_capture_delay: float = 2.0
    """Seconds between the two stack snapshots taken when a session hangs."""
    diag_signal: str | None = None
    """Signal name on which processes dump their stacks with `faulthandler`."""
    loglevel: str | None = None
    """The log level handed to the runtime (tractor's ``loglevel``)."""

    # Mirrors of tractor's runtime vars.
    _registry_addrs: list[Addr] = msgspec.field(default_factory=list)
    _enable_tpts: list[str] = msgspec.field(default_factory=list)
    _debug_mode: bool = False
    _is_root: bool = False
    _root_mailbox: tuple[str | None, int | str | None] = (None, None)
    _root_addrs: list[Addr] = msgspec.field(default_factory=list)
    use_greenback: bool = False
    use_stackscope: bool = False
    _is_infected_aio: bool = False

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for tractor's ``open_root_actor()``.

        ``registry_addrs``, ``enable_transports`` (the envelope's transports,
        else its ``tpt_proto``), ``debug_mode`` and ``loglevel``, so a script
        can call ``open_root_actor(**load_rtvars().as_kwargs())``.
        """
        transports = list(self._enable_tpts)
        if not transports and self.tpt_proto:
            transports = [self.tpt_proto]
        return {
            "registry_addrs": [tuple(addr) for addr in self._registry_addrs],
            "enable_transports": transports,
            "debug_mode": self._debug_mode,
            "loglevel": self.loglevel,
        }

    def to_dict(self) -> dict[str, Any]:
        """The envelope as a plain dict of builtins, tuples kept.

        Fields equal to their default value are left out, as in the encoded
        text.
        """
        # msgspec's omit_defaults compares a tuple default by identity, so an
        # equal but new (None, None) would stay: compare by value here.
        plain: dict[str, Any] = msgspec.to_builtins(self)
        return {key: value for key, value in plain.items() if value != _DEFAULTS[key]}


_FIELDS: Final = frozenset(RuntimeVars.__struct_fields__)
_DEFAULTS: Final = {
    field.name: field.default_factory()
    if field.default is msgspec.NODEFAULT
    else field.default
    for field in msgspec.structs.fields(RuntimeVars)
}


# ---------------------------------------------------------------- encoding


def _plain(rtvars: RuntimeVars | Mapping[str, Any], *, name: str) -> dict[str, Any]:
    """The dict to encode: known fields validated, defaults dropped, unknown kept."""
    if isinstance(rtvars, RuntimeVars):
        return rtvars.to_dict()
    if not isinstance(rtvars, Mapping):
        msg = (
            f"cannot encode an envelope from {_short(rtvars)}: pass a "
            "RuntimeVars or a dict of its fields"
        )
        raise RtVarsError(msg)
    data = dict(rtvars)
    # Validate what we know, keep what we do not (see module docstring). Known
    # fields come first, in the struct's order, so equal envelopes encode to
    # equal text.
    known = _convert(data, name=name).to_dict()
    known.update((key, value) for key, value in data.items() if key not in _FIELDS)
    return known


def encode_rtvars(
    rtvars: RuntimeVars | Mapping[str, Any], *, name: str = RT_VARS_ENV
) -> str:
    """Encode *rtvars* to the text of the environment variable.

    *rtvars* is a `RuntimeVars` or a dict of its fields; a dict's keys unknown
    to `RuntimeVars` are kept as they are. Fields at their default value are
    left out, which keeps the text short and quick to decode.

    Raises `RtVarsError` when a value is not a plain builtin (its ``repr``
    would not decode in the child), is nested deeper than `MAX_DEPTH`, is an
    int of more than `MAX_DIGITS` digits, or when ``NAME=value`` exceeds the
    128 KiB that Linux allows one environment string.
    """
    plain = _plain(rtvars, name=name)
    # A value whose repr is not a literal (a Path, an enum, nan) would be
    # written fine and then fail in every child: catch it here.
    _check_plain(plain, name)
    text = repr(plain)
    _check_size(len(text.encode("utf-8")), name=name)
    return text


def dump_rtvars(
    rtvars: RuntimeVars | Mapping[str, Any], *, name: str = RT_VARS_ENV
) -> tuple[str, str]:
    """Return ``(name, value)``: the environment variable for *rtvars*.

    The value is ``repr`` of a plain dict, decodable with `load_rtvars`.
    Raises `RtVarsError` as `encode_rtvars` does.
    """
    return name, encode_rtvars(rtvars, name=name)


# Exact types only: a subclass (an IntEnum, a str-based enum) has a repr that
# is not a literal.
_SCALARS: Final = frozenset({str, bool, type(None)})
_INT_LIMIT: Final = 10**MAX_DIGITS


def _check_plain(data: dict[str, Any], name: str) -> None:
    """Raise `RtVarsError` unless *data* holds only what decodes back equal."""
    for key, value in data.items():
        # Inlined for the common shapes (a scalar, a list or tuple of scalars
        # or of flat tuples): this runs on every decode.
        kind = type(value)
        if kind in _SCALARS:
            continue
        if kind is list or kind is tuple:
            for item in value:
                kind = type(item)
                if kind in _SCALARS:
                    continue
                if kind is tuple and all(map(_is_flat_scalar, item)):
                    continue
                break
            else:
                continue
        _check_value(value, name, (key,), 2)


def _is_flat_scalar(value: Any) -> bool:
    kind = type(value)
    return kind in _SCALARS or (kind is int and -_INT_LIMIT < value < _INT_LIMIT)


def _check_value(value: Any, name: str, path: tuple[Any, ...], depth: int) -> None:
    kind = type(value)
    if kind in _SCALARS:
        return
    if kind is int:
        if -_INT_LIMIT < value < _INT_LIMIT:
            return
        problem = f"an int of more than {MAX_DIGITS} digits"
        fix = "store it as a str"
    elif kind is float:
        if math.isfinite(value):
            return
        problem = "not a finite number"
        fix = "use None for 'no limit'"
    elif kind is list or kind is tuple or kind is dict:
        if depth > MAX_DEPTH:
            problem = f"nested deeper than {MAX_DEPTH} levels"
            fix = "flatten the value"
        elif kind is dict:
            for key, item in value.items():
                _check_value(key, name, (*path, "<key>"), depth + 1)
                _check_value(item, name, (*path, key), depth + 1)
            return
        else:
            for index, item in enumerate(value):
                _check_value(item, name, (*path, index), depth + 1)
            return
    else:
        problem = f"a value of type {kind.__name__}, which the envelope cannot carry"
        fix = (
            "the envelope holds only str, int, float, bool, None, list, tuple "
            "and dict; convert the value first (a Path with str(), an enum "
            "with .value)"
        )
    steps = [f"[{step!r}]" for step in path]
    if len(steps) > 6:
        steps[3:-2] = ["..."]
    msg = f"{name}{''.join(steps)} = {_short(value)}: {problem}; {fix}"
    raise RtVarsError(msg)


def _check_size(size: int, *, name: str) -> None:
    # The kernel counts NAME, "=", the value and the terminating NUL.
    total = len(name.encode("utf-8", "surrogateescape")) + 1 + size + 1
    if total > MAX_ENV_STRING:
        msg = (
            f"{name} is {size:,} bytes; one environment string may hold at most "
            f"{MAX_ENV_STRING:,} bytes with its name and terminating NUL. Keep "
            "large data out of the envelope: write it to a file in the "
            "bindspace and put the path in the envelope"
        )
        raise RtVarsError(msg)


# ---------------------------------------------------------------- decoding
#
# Decoding has two paths. A text that matches `_REPR_TEXT` (what `repr` of a
# plain dict looks like) holds no name, no operator and no way to chain calls
# or subscripts, so no parser can be driven deep or slow by it: it is read
# directly, as JSON when it has no escapes and only flat tuples (the usual
# envelope, where `RuntimeVars` restores the tuples), else with
# `ast.literal_eval`. Anything else takes `_check_structure` first, which
# bounds the text (depth, digits, sign runs) and rejects code with a message
# that says where it is, and only then lets `ast.literal_eval` see it.

# The escapes repr() writes, plus \" and \N{...}: none of them warns. Octal
# escapes above \377 do (a DeprecationWarning), so they take the slow path,
# where a warning is an error.
_ESCAPE: Final = r"""\\[\\'"nrtxuUN]"""
# Written as "run of plain characters, then (escape, run)*" rather than
# "(character | escape)*": the same strings, matched several times faster.
_STRING: Final = (
    rf"""'[^'\\\n\r]*+(?:{_ESCAPE}[^'\\\n\r]*+)*+'"""
    rf"""|"[^"\\\n\r]*+(?:{_ESCAPE}[^"\\\n\r]*+)*+\""""
)
_NUMBER: Final = (
    rf"-?[0-9]{{1,{MAX_DIGITS}}}(?:\.[0-9]{{1,{MAX_DIGITS}}})?(?:e[-+][0-9]{{1,3}})?"
)
_REPR_TEXT: Final = re.compile(
    # Tokens, each optionally after one space. A value (and a closing bracket)
    # must be followed by a comma, a colon, a closing bracket or the end: that
    # rules out calls, subscripts, binary operators and implicit string
    # concatenation, the only ways flat text could build a deep syntax tree.
    r"(?:[,:\[({]|\x20?(?:[\[({]"
    rf"|(?:{_STRING}|{_NUMBER}|True|False|None|[\])}}])(?=[,:\])}}]|\Z)))*+"
)

# Used on the rare text outside `_REPR_TEXT`. Strings and comments, matched so
# that the scan is linear: an opening quote always matches up to its closing
# quote, the end of its line or the end of the text, so the scanner never
# restarts inside a string.
_STRING_ANYWHERE: Final = re.compile(
    r"""'''[\s\S]*?(?:'''|\Z)|\"\"\"[\s\S]*?(?:\"\"\"|\Z)"""
    r"""|'(?:[^'\\\n]|\\[\s\S])*+(?:'|(?=\n)|\Z)"""
    r"""|"(?:[^"\\\n]|\\[\s\S])*+(?:"|(?=\n)|\Z)"""
    r"|\#[^\n]*"
)
_NUMBER_OR_WORD: Final = re.compile(
    r"0[xXoObB][0-9a-fA-F_]*"
    r"|(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9_]+)?[jJ]?"
    r"|([^\W\d]\w*)"
)
_DIGIT_RUN: Final = re.compile(r"[0-9][0-9_]{%d,}" % MAX_DIGITS)  # noqa: UP031
_SIGN_RUN: Final = re.compile(r"[-+](?:\s*[-+]){3,}")
# Operators no literal needs: everything but the signs of numbers. Each
# pattern starts with a character class, which the re module scans for fast.
_OPERATOR: Final = re.compile(
    r"[*/%@&|^<>=!;~`$?\\]"
    r"|\.(?<![0-9]\.)(?![0-9])"
    r"|[\w'\")\]}](?<![0-9.][eE])\s*[-+]"
)
_BRACKET: Final = re.compile(r"[\[\](){}]")
# An opening bracket right after a value calls or subscripts it; a chain of
# them builds a syntax tree as deep as the text is long.
_CALL_OR_SUBSCRIPT: Final = re.compile(r"[\w'\")\]}]\s*[\[(]")
_STRANGE_CHAR: Final = re.compile(r"[^\x20-\x7e\t\n\r\x0c]")
_CONSTANTS: Final = frozenset({"True", "False", "None"})
_STRING_PREFIXES: Final = frozenset({"r", "u", "b", "br", "rb"})


def _where(text: str, offset: int) -> str:
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    if line == 1:
        return f"character {column:,}"
    return f"line {line:,}, column {column:,}"


def _line_column(line: int | None, column: int | None) -> str:
    """The same wording as `_where`, from a line and a 1-based column."""
    if not line or not column:
        return "an unknown place"
    if line == 1:
        return f"character {column:,}"
    return f"line {line:,}, column {column:,}"


def _excerpt(text: str, offset: int, width: int = 24) -> str:
    return repr(
        text[offset : offset + width] + ("..." if offset + width < len(text) else "")
    )


def _rejection(
    name: str, text: str, offset: int, problem: str, fix: str
) -> RtVarsError:
    """An error saying what *problem* is at *offset* of *text*, and the fix."""
    return RtVarsError(
        f"{name} {problem} at {_where(text, offset)} ({_excerpt(text, offset)}); {fix}"
    )


_LITERALS_ONLY: Final = (
    "the envelope holds only literals (str, int, float, bool, None, list, "
    "tuple, dict) as repr() writes them, and is never executed"
)


def _check_text(text: str, *, name: str) -> None:
    """Refuse text that is too large, not UTF-8 text, or empty."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        if "\udc80" <= bad <= "\udcff":
            # os.environ and psutil keep undecodable bytes as lone surrogates
            # (the surrogateescape error handler): name the original byte.
            what = f"the byte 0x{ord(bad) - 0xDC00:02X}, which is not UTF-8,"
        else:
            what = f"the lone surrogate {bad!r}"
        raise _rejection(
            name,
            text,
            exc.start,
            f"holds {what}",
            "the envelope must be valid UTF-8 text; re-encode it with dump_rtvars()",
        ) from None
    _check_size(size, name=name)
    if (nul := text.find("\0")) >= 0:
        raise _rejection(name, text, nul, "holds a NUL character", _LITERALS_ONLY)
    if not text.strip():
        msg = (
            f"{name} is set but empty ({text!r}); unset it, or set it to '{{}}' "
            "for an envelope of defaults"
        )
        raise RtVarsError(msg)


def _check_structure(text: str, *, name: str) -> None:
    """Bound and vet text that does not look like repr() output.

    Raises `RtVarsError` naming the first thing that is code, too deep or too
    long, with its position in *text*.
    """
    # Strings may hold anything: look at the structure around them. The
    # skeleton keeps every offset of the text, so positions stay true.
    skeleton = _STRING_ANYWHERE.sub(
        lambda m: m.group()[0] + " " * (len(m.group()) - 1), text
    )
    if strange := _STRANGE_CHAR.search(skeleton):
        raise _rejection(
            name,
            text,
            strange.start(),
            f"holds the character {strange.group()!r} outside a string",
            _LITERALS_ONLY,
        )
    for match in _NUMBER_OR_WORD.finditer(skeleton):
        word = match.group(1)
        if word is None or word in _CONSTANTS:
            continue
        quoted = skeleton[match.end() : match.end() + 1] in ("'", '"')
        if quoted and word.lower() in _STRING_PREFIXES:
            continue
        if quoted and set(word.lower()) & {"f", "t"}:
            kind = "an f-string" if "f" in word.lower() else "a t-string"
            problem = f"holds {kind} (code inside a string)"
        else:
            problem = f"holds the name {word!r} (code, not a literal)"
        raise _rejection(name, text, match.start(), problem, _LITERALS_ONLY)
    if operator := _OPERATOR.search(skeleton):
        raise _rejection(
            name,
            text,
            operator.end() - 1,
            f"holds the operator {operator.group()[-1]!r}",
            _LITERALS_ONLY,
        )
    if chain := _CALL_OR_SUBSCRIPT.search(skeleton):
        raise _rejection(
            name,
            text,
            chain.end() - 1,
            "holds a call or a subscript",
            _LITERALS_ONLY,
        )
    if digits := _DIGIT_RUN.search(skeleton):
        raise _rejection(
            name,
            text,
            digits.start(),
            f"holds a number of {len(digits.group()):,} digits",
            f"at most {MAX_DIGITS} are accepted; store a longer one as a str",
        )
    if signs := _SIGN_RUN.search(skeleton):
        raise _rejection(
            name,
            text,
            signs.start(),
            "holds a run of sign operators",
            "write the number itself, e.g. -1",
        )
    depth = 0
    for bracket in _BRACKET.finditer(skeleton):
        if bracket.group() in "([{":
            depth += 1
            if depth > MAX_DEPTH:
                raise _rejection(
                    name,
                    text,
                    bracket.start(),
                    f"nests deeper than {MAX_DEPTH} brackets",
                    "an envelope is a flat dict of lists and tuples",
                )
        else:
            depth -= 1


_TO_JSON_BRACKETS: Final = str.maketrans("()", "[]")
# "(" not followed by a comma before the next bracket: "()", "(x)" (which is
# x, not a tuple) or a tuple that starts with a container. JSON would read
# each of them differently from Python, so they take ast.literal_eval.
_PAREN_NOT_FLAT_TUPLE: Final = re.compile(r"\((?![^()\[\]{}]*,)")


def _parse_as_json(text: str) -> Any:
    """The value of repr-shaped *text*, read as JSON with tuples as lists.

    Several times faster than `ast.literal_eval`, and equal to it except for
    tuples, which come back as lists; returns ``None`` for text it cannot read
    that way. Only for text that matched `_REPR_TEXT` (no names, operators or
    calls) and passed `_check_text` (no NUL): then Python and JSON agree on
    every token this function lets through.
    """
    # Without escapes and double quotes, every ' opens or closes a string,
    # so the pieces between quotes alternate: structure, string, structure...
    if "\\" in text or '"' in text:
        return None
    pieces = text.split("'")
    structure = "\0".join(pieces[::2])
    if sum(map(structure.count, "([{")) > MAX_DEPTH or (
        "(" in structure and _PAREN_NOT_FLAT_TUPLE.search(structure)
    ):
        # More brackets than MAX_DEPTH could nest deeper than json's C scanner
        # should recurse; the bounded path handles such text.
        return None
    structure = (
        structure.translate(_TO_JSON_BRACKETS)
        .replace("True", "true")
        .replace("False", "false")
        .replace("None", "null")
    )
    pieces[::2] = structure.split("\0")
    try:
        return json.loads('"'.join(pieces))
    except ValueError:
        # Trailing commas, sets, keys that are not strings, control characters
        # in strings: Python literals that are not JSON.
        return None


def _parse(text: str, *, name: str, keep_tuples: bool = True) -> Any:
    """The literal *text* stands for, after bounding it; raises `RtVarsError`.

    With ``keep_tuples=False`` a tuple may come back as a list, which is all
    `msgspec.convert` needs and lets repr-shaped text skip the Python parser.
    """
    _check_text(text, name=name)
    if _REPR_TEXT.fullmatch(text):
        # The common case, a well-formed envelope, costs one fast parse.
        if not keep_tuples and (data := _parse_as_json(text)) is not None:
            return data
        try:
            return ast.literal_eval(text)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            pass
    # Here on the rare text that is not shaped like repr() output, or did not
    # parse: bound it, and name the first problem found, before parsing again.
    _check_structure(text, name=name)
    try:
        with warnings.catch_warnings():
            # An invalid escape such as '\q' is only a warning to Python;
            # here it is a mistake to report, not to print in every process.
            warnings.simplefilter("error")
            return ast.literal_eval(text.strip())
    except (
        ValueError,
        TypeError,
        SyntaxError,
        MemoryError,
        RecursionError,
        Warning,
    ):
        pass
    _explain(text, name=name)
    msg = f"{name} is not a plain literal"  # _explain always raises first
    raise RtVarsError(msg)


def _explain(text: str, *, name: str) -> None:
    """Raise an `RtVarsError` that says what is wrong with *text*, and where."""
    # The parser sees the text without its surrounding whitespace (indented
    # text is an IndentationError to it); positions are given in *text*.
    body = text.strip()
    lead = text[: len(text) - len(text.lstrip())]
    lead_lines = lead.count("\n")
    lead_columns = len(lead) - (lead.rfind("\n") + 1)

    def where(line: int | None, column: int | None) -> str:
        if line is not None and column is not None and line == 1:
            column += lead_columns
        return _line_column(line and line + lead_lines, column)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            tree = ast.parse(body, mode="eval")
    except SyntaxError as exc:
        at = where(exc.lineno, exc.offset)
        msg = (
            f"{name} is not a Python literal: {exc.msg} at {at}; "
            "it may be truncated or hand-edited. Write it with dump_rtvars()"
        )
        raise RtVarsError(msg) from None
    except (ValueError, MemoryError, RecursionError, Warning) as exc:
        msg = f"{name} cannot be parsed: {exc}; write it with dump_rtvars()"
        raise RtVarsError(msg) from None
    for node in ast.walk(tree.body):
        if not isinstance(node, _LITERAL_NODES):
            kind = type(node).__name__
            at = where(node.lineno, node.col_offset + 1)  # type: ignore[attr-defined]
            msg = f"{name} holds a {kind} expression at {at}; {_LITERALS_ONLY}"
            raise RtVarsError(msg)
    msg = (
        f"{name} is not a plain literal: {_short(body)}; a number with a sign "
        "operator in the wrong place, or a dict key that is a list, can cause "
        "this. Write it with dump_rtvars()"
    )
    raise RtVarsError(msg)


_LITERAL_NODES: Final = (
    ast.Constant,
    ast.Dict,
    ast.List,
    ast.Tuple,
    ast.Set,
    ast.UnaryOp,
    ast.BinOp,  # complex numbers only, as ast.literal_eval allows
    ast.Load,
    ast.USub,
    ast.UAdd,
    ast.Add,
    ast.Sub,
)


def _convert(data: Any, *, name: str) -> RuntimeVars:
    if not isinstance(data, dict):
        msg = (
            f"{name} must encode a dict of runtime vars, got a "
            f"{type(data).__name__}: {_short(data)}; wrap the fields in {{...}}"
        )
        raise RtVarsError(msg)
    for key in data:
        if type(key) is not str:
            msg = (
                f"{name} has a key that is not a str: {_short(key)}; field "
                "names are strings such as 'session'"
            )
            raise RtVarsError(msg)
    # Only the known keys go to msgspec: it would ignore the others anyway, but
    # first encode them as UTF-8, which fails on a key with a lone surrogate.
    known = {key: value for key, value in data.items() if key in _FIELDS}
    try:
        return msgspec.convert(known, RuntimeVars, strict=True)
    except msgspec.ValidationError as exc:
        # msgspec names the field as `$.field[0]`; say it without the `$.`.
        detail = str(exc).replace("`$.", "`").replace("`$`", "the envelope")
        msg = f"{name} has a field of the wrong type: {detail}"
        raise RtVarsError(msg) from None


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _decode_plain(
    text: str, *, name: str, keep_tuples: bool = True
) -> tuple[dict[str, Any], RuntimeVars]:
    """The envelope as a plain dict and as `RuntimeVars`; raises `RtVarsError`.

    With ``keep_tuples=False``, tuples in the dict may be lists (the struct is
    the same either way).
    """
    data = _parse(text, name=name, keep_tuples=keep_tuples)
    try:
        rtvars = _convert(data, name=name)
        # After _convert, data is a dict with str keys; sets, bytes, complex
        # numbers, Ellipsis and inf are literals too, but not envelope values.
        _check_plain(data, name)
    except RtVarsError:
        if keep_tuples:
            raise
        # Report the value as it was written, tuples and all.
        return _decode_plain(text, name=name, keep_tuples=True)
    return data, rtvars


def decode_rtvars(text: str, *, name: str = RT_VARS_ENV) -> RuntimeVars:
    """Decode the text of the environment variable into `RuntimeVars`.

    Keys unknown to `RuntimeVars` are ignored (`read_raw_rtvars` keeps them).
    Raises `RtVarsError` for anything that is not a bounded literal dict of
    the right field types; nothing in *text* is ever executed.
    """
    data, rtvars = _decode_plain(text, name=name, keep_tuples=False)
    if log.isEnabledFor(logging.DEBUG):
        unknown = set(data) - _FIELDS
        if unknown:
            log.debug("Ignoring unknown envelope keys %s.", sorted(unknown))
    return rtvars


def load_rtvars(
    env: Mapping[str, str] | None = None,
    *,
    missing_ok: bool = False,
    name: str = RT_VARS_ENV,
) -> RuntimeVars:
    """Read the envelope from *env* (default: this process's environment).

    When the variable is absent, raise `RtVarsMissing` (an `RtVarsError`), or,
    with ``missing_ok=True``, return an empty `RuntimeVars` of defaults. A
    present but malformed envelope always raises `RtVarsError`.
    """
    source = os.environ if env is None else env
    text = source.get(name)
    if text is None:
        if missing_ok:
            return RuntimeVars()
        msg = (
            f"{name} is not set: this process is not part of a harness "
            "session. Run it under `harness exec -- CMD`, or pass "
            "missing_ok=True to get defaults"
        )
        raise RtVarsMissing(msg)
    return decode_rtvars(text, name=name)


def get_rtvars(
    proc: psutil.Process | None = None,
    *,
    missing_ok: bool = False,
    name: str = RT_VARS_ENV,
) -> RuntimeVars:
    """Read the envelope of *proc* (a `psutil.Process`), or of this process.

    Another process's environment is the one it was started with
    (``/proc/<pid>/environ``), not later changes to its ``os.environ``.
    Raises `RtVarsError` as `load_rtvars` does (bytes that are not UTF-8 are
    named with their position), and psutil's ``NoSuchProcess`` /
    ``AccessDenied`` when the environment cannot be read.
    """
    if proc is None:
        return load_rtvars(missing_ok=missing_ok, name=name)
    return load_rtvars(proc.environ(), missing_ok=missing_ok, name=name)


def read_raw_rtvars(
    env: Mapping[str, str] | None = None, *, name: str = RT_VARS_ENV
) -> dict[str, Any]:
    """The decoded envelope as a plain dict, unknown keys included.

    An absent variable gives ``{}``; a malformed one raises `RtVarsError`.
    """
    text = (os.environ if env is None else env).get(name)
    if text is None:
        return {}
    data, _ = _decode_plain(text, name=name)
    return data


def update_rtvars(
    rtvars: RuntimeVars | Mapping[str, Any] | None = None,
    update_osenv: bool | MutableMapping[str, str] = True,
    *,
    name: str = RT_VARS_ENV,
) -> tuple[str, str]:
    """Merge *rtvars* into the current envelope, re-encode it, and store it.

    The current envelope is read from the mapping being updated (with
    ``update_osenv=False``, from `os.environ`). Keys set in a dict *rtvars*
    win; a `RuntimeVars` sets every field, defaults included. Keys unknown to
    this version are kept.

    *update_osenv*: ``True`` writes into `os.environ` (so children started
    from now on inherit it), a dict writes into that dict, ``False`` writes
    nowhere. Returns ``(name, value)`` either way. Raises `RtVarsError` when
    the current envelope or the result is malformed; nothing is written then.
    """
    target: MutableMapping[str, str] | None
    if update_osenv is True:
        target = os.environ
    elif update_osenv is False:
        target = None
    else:
        target = update_osenv
    current = read_raw_rtvars(target, name=name)
    if rtvars is None:
        changes: dict[str, Any] = {}
    elif isinstance(rtvars, RuntimeVars):
        changes = msgspec.structs.asdict(rtvars)
    else:
        changes = dict(rtvars)
    value = encode_rtvars({**current, **changes}, name=name)
    if target is not None:
        target[name] = value
    return name, value
