"""The envelope: a typed `RuntimeVars` carried in one environment variable.

The value of ``_TRACTOR_RT_VARS`` is the ``repr`` of a plain dict of builtins
(``str``, ``int``, ``float``, ``bool``, ``None``, ``list``, ``tuple``,
``dict``). It is decoded with `ast.literal_eval` and hydrated with
`msgspec.convert`, so tuples survive the trip, the text stays readable in
``/proc/<pid>/environ`` and a wrong type is an error that names the field.

Because every child process inherits its parent's environment, one envelope
set by the harness reaches every process of a session, including scripts the
tests start as plain subprocesses and orphans re-parented to init.

Unknown keys: a reader ignores keys it does not know (a newer writer may add
fields), and `update_rtvars` keeps them when it re-encodes, so an older
process in the middle of a tree never strips what a newer one added.
"""

from __future__ import annotations

import ast
import logging
import math
import os
import re
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Final

import msgspec

from harness.errors import RtVarsError, RtVarsMissing

if TYPE_CHECKING:
    import psutil

log = logging.getLogger("harness.rtvars")

#: The environment variable that carries the envelope.
RT_VARS_ENV: Final = "_TRACTOR_RT_VARS"

#: Linux refuses a single ``NAME=value`` string longer than 128 KiB
#: (``MAX_ARG_STRLEN``) at ``exec`` time with ``E2BIG``; refusing earlier, in
#: `dump_rtvars`, gives a message that names the envelope instead.
MAX_ENV_STRING: Final = 128 * 1024

#: Deepest nesting of brackets accepted. Real envelopes nest three deep
#: (dict -> list -> tuple); the bound keeps `ast` far from the C stack limits
#: that deep input can hit (CPython gh-95588, gh-126711).
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
        """The envelope as a plain dict of builtins (tuples kept)."""
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]


# ---------------------------------------------------------------- encoding


def _plain(rtvars: RuntimeVars | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(rtvars, RuntimeVars):
        return rtvars.to_dict()
    if isinstance(rtvars, Mapping):
        # Validate what we know, keep what we do not (see module docstring).
        known = _convert(dict(rtvars), name=RT_VARS_ENV).to_dict()
        return {**dict(rtvars), **known}
    msg = (
        f"cannot encode an envelope from {type(rtvars).__name__!r}: pass a "
        "RuntimeVars or a dict of its fields"
    )
    raise RtVarsError(msg)


def encode_rtvars(
    rtvars: RuntimeVars | Mapping[str, Any], *, name: str = RT_VARS_ENV
) -> str:
    """Encode *rtvars* to the text of the environment variable.

    Fields at their default value are left out, which keeps the text short
    and quick to decode. Raises `RtVarsError` when a value is not a plain
    builtin (its ``repr`` would not decode in the child) or when
    ``NAME=value`` exceeds the 128 KiB that Linux allows one environment
    string.
    """
    plain = _plain(rtvars)
    # A value whose repr is not a literal (a Path, a custom object, nan)
    # would be written fine and then fail in every child: catch it here.
    for key, value in plain.items():
        _check_plain(value, f"{name}[{key!r}]", depth=1)
    text = repr(plain)
    _check_text(text, name=name)
    return text


_PLAIN_SCALARS = (str, int, bool, type(None))


def _check_plain(value: Any, where: str, depth: int) -> None:
    if isinstance(value, _PLAIN_SCALARS):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            msg = f"cannot encode {where} = {value!r}: not a finite number"
            raise RtVarsError(msg)
        return
    if depth >= MAX_DEPTH:
        msg = f"cannot encode {where}: nested deeper than {MAX_DEPTH} levels"
        raise RtVarsError(msg)
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, f"{where} key {key!r}", depth + 1)
            _check_plain(item, f"{where}[{key!r}]", depth + 1)
        return
    msg = (
        f"cannot encode {where} = {_short(value)}: the envelope holds only "
        "str, int, float, bool, None, list, tuple and dict (convert "
        f"{type(value).__name__} first, e.g. a Path with str())"
    )
    raise RtVarsError(msg)


def dump_rtvars(
    rtvars: RuntimeVars | Mapping[str, Any], *, name: str = RT_VARS_ENV
) -> tuple[str, str]:
    """Return ``(name, value)``: the environment variable for *rtvars*.

    The value is ``repr`` of a plain dict, decodable with `load_rtvars`.
    Raises `RtVarsError` as `encode_rtvars` does.
    """
    return name, encode_rtvars(rtvars, name=name)


# ---------------------------------------------------------------- decoding

_STRING_LITERAL = re.compile(
    r"""[rRbBuU]{0,2}(?:'''[\s\S]*?'''|\"\"\"[\s\S]*?\"\"\"|'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*")"""
)
_LONG_NUMBER = re.compile(r"\d{%d,}" % (MAX_DIGITS + 1))  # noqa: UP031
_UNARY_RUN = re.compile(r"[-+~](?:\s*[-+~]){3,}")


def _where(text: str, offset: int) -> str:
    line = text.count("\n", 0, offset) + 1
    col = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return f"line {line}, column {col}"


def _check_text(text: str, *, name: str) -> None:
    """Bound the text before any parser sees it."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size + len(name) + 2 > MAX_ENV_STRING:
        msg = (
            f"{name} is {size:,} bytes; one environment string may hold at "
            f"most {MAX_ENV_STRING:,} bytes with its name. Keep large data "
            "out of the envelope (write it to a file in the bindspace and "
            "put the path in the envelope)"
        )
        raise RtVarsError(msg)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        msg = (
            f"{name} is not valid UTF-8 at {_where(text, exc.start)} "
            f"({text[exc.start : exc.end]!r}); the envelope must be text"
        )
        raise RtVarsError(msg) from None

    # Strings may hold any bracket or digit: measure the structure without them.
    skeleton = _STRING_LITERAL.sub(lambda m: "''", text)
    if sum(map(skeleton.count, "([{")) > MAX_DEPTH:
        depth = 0
        for offset, char in enumerate(skeleton):
            if char in "([{":
                depth += 1
                if depth > MAX_DEPTH:
                    msg = (
                        f"{name} nests deeper than {MAX_DEPTH} brackets "
                        f"(near character {offset + 1} of the text without "
                        "its strings); an envelope is a flat dict of lists "
                        "and tuples"
                    )
                    raise RtVarsError(msg)
            elif char in ")]}":
                depth -= 1
    if match := _LONG_NUMBER.search(skeleton):
        msg = (
            f"{name} holds a number of {len(match.group()):,} digits; at most "
            f"{MAX_DIGITS} are accepted"
        )
        raise RtVarsError(msg)
    if match := _UNARY_RUN.search(skeleton):
        msg = (
            f"{name} holds a run of sign operators {match.group()[:20]!r}; "
            "write the number itself"
        )
        raise RtVarsError(msg)


_LITERAL_NODES = (
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


def _parse(text: str, *, name: str) -> Any:
    _check_text(text, name=name)
    # The common case, a well-formed envelope, costs one parse.
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        pass
    _explain(text.strip(), name=name)
    msg = f"{name} is not a plain literal"  # _explain always raises first
    raise RtVarsError(msg)


def _explain(text: str, *, name: str) -> None:
    """Raise an `RtVarsError` that says what is wrong with *text*, and where."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        where = f"line {exc.lineno}, column {exc.offset}" if exc.lineno else "?"
        msg = f"{name} is not a Python literal: {exc.msg} at {where}"
        raise RtVarsError(msg) from None
    except (ValueError, MemoryError, RecursionError) as exc:
        msg = f"{name} cannot be parsed: {exc}"
        raise RtVarsError(msg) from None
    for node in ast.walk(tree.body):
        if not isinstance(node, _LITERAL_NODES):
            kind = type(node).__name__
            where = f"line {node.lineno}, column {node.col_offset + 1}"  # type: ignore[attr-defined]
            msg = (
                f"{name} may hold only literals (str, int, float, bool, None, "
                f"list, tuple, dict); found {kind} at {where}"
            )
            raise RtVarsError(msg)
    try:
        ast.literal_eval(tree.body)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as exc:
        msg = f"{name} is not a plain literal: {exc}"
        raise RtVarsError(msg) from None


def _convert(data: Any, *, name: str) -> RuntimeVars:
    if not isinstance(data, dict):
        msg = (
            f"{name} must encode a dict of runtime vars, got a "
            f"{type(data).__name__}: {_short(data)}"
        )
        raise RtVarsError(msg)
    for key in data:
        if not isinstance(key, str):
            msg = f"{name} has a key that is not a string: {_short(key)}"
            raise RtVarsError(msg)
    try:
        return msgspec.convert(data, RuntimeVars, strict=True)
    except msgspec.ValidationError as exc:
        # msgspec names the field as `$.field[0]`; say it without the `$.`.
        detail = str(exc).replace("`$.", "`").replace("`$`", "the envelope")
        msg = f"{name} has a field of the wrong type: {detail}"
        raise RtVarsError(msg) from None


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def decode_rtvars(text: str, *, name: str = RT_VARS_ENV) -> RuntimeVars:
    """Decode the text of the environment variable into `RuntimeVars`.

    Raises `RtVarsError` for anything that is not a bounded literal dict of
    the right field types; nothing in *text* is ever executed.
    """
    data = _parse(text, name=name)
    rtvars = _convert(data, name=name)
    if log.isEnabledFor(logging.DEBUG):
        unknown = set(data) - set(RuntimeVars.__struct_fields__)
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
    Raises `RtVarsError` as `load_rtvars` does, and psutil's
    ``NoSuchProcess`` / ``AccessDenied`` when the environment cannot be read.
    """
    if proc is None:
        return load_rtvars(missing_ok=missing_ok, name=name)
    return load_rtvars(proc.environ(), missing_ok=missing_ok, name=name)


def read_raw_rtvars(
    env: Mapping[str, str] | None = None, *, name: str = RT_VARS_ENV
) -> dict[str, Any]:
    """The decoded envelope as a plain dict, unknown keys included."""
    text = (os.environ if env is None else env).get(name)
    if text is None:
        return {}
    data = _parse(text, name=name)
    _convert(data, name=name)
    return dict(data)


def update_rtvars(
    rtvars: RuntimeVars | Mapping[str, Any] | None = None,
    update_osenv: bool | MutableMapping[str, str] = True,
    *,
    name: str = RT_VARS_ENV,
) -> tuple[str, str]:
    """Merge *rtvars* into the current envelope, re-encode it, and store it.

    The current envelope is read from the mapping being updated (or
    `os.environ`). Fields set in *rtvars* win; when it is a `RuntimeVars`,
    all its fields are taken. Keys unknown to this version are kept.

    *update_osenv*: ``True`` writes into `os.environ` (so children started
    from now on inherit it), a dict writes into that dict, ``False`` writes
    nowhere. Returns ``(name, value)`` either way.
    """
    target: MutableMapping[str, str] | None
    if update_osenv is True:
        target = os.environ
    elif update_osenv is False:
        target = None
    else:
        target = update_osenv
    current = read_raw_rtvars(target if target is not None else None, name=name)
    if rtvars is None:
        changes: dict[str, Any] = {}
    elif isinstance(rtvars, RuntimeVars):
        changes = rtvars.to_dict()
    else:
        changes = dict(rtvars)
    merged = {**current, **changes}
    value = encode_rtvars(merged, name=name)
    if target is not None:
        target[name] = value
    return name, value
