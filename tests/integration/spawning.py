"""Start children through a spawn backend, as the runtime under test would.

``trio`` starts a child with `trio.run_process` (a fresh interpreter);
``mp_spawn`` and ``mp_forkserver`` use `multiprocessing` contexts of those
names. In every case the child inherits the parent's environment, so the
envelope is the only thing it needs to find its session.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import tiny_registry

BACKENDS = ("trio", "mp_spawn", "mp_forkserver")

#: A child started by path, as tractor starts its own by module.
CHILD_SCRIPT = str(Path(tiny_registry.__file__).resolve())


def spawn_children(
    backend: str,
    names: Sequence[str],
    target: Callable[[str], None] = tiny_registry.join,
    timeout: float = 60.0,
) -> None:
    """Run one child per name with *backend*; each calls ``target(name)``
    (``trio`` runs the registry script instead, which calls `join`).

    Raises `RuntimeError` when a child fails.
    """
    if backend == "trio":
        _spawn_trio(names, grandchild=target is tiny_registry.join_with_grandchild)
    elif backend in ("mp_spawn", "mp_forkserver"):
        _spawn_mp(backend.removeprefix("mp_"), names, target, timeout)
    else:
        msg = f"unknown spawn backend {backend!r}; known: {', '.join(BACKENDS)}"
        raise ValueError(msg)


def _spawn_trio(names: Sequence[str], *, grandchild: bool) -> None:
    import trio

    code = (
        "import sys; sys.path.insert(0, {folder!r}); import tiny_registry; "
        "tiny_registry.{func}(sys.argv[1])"
    )
    func = "join_with_grandchild" if grandchild else "join"
    folder = str(Path(CHILD_SCRIPT).parent)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for name in names:
                argv = [
                    sys.executable,
                    "-c",
                    code.format(folder=folder, func=func),
                    name,
                ]
                nursery.start_soon(lambda a=argv: trio.run_process(a, check=True))

    trio.run(main)


def _spawn_mp(
    method: str, names: Sequence[str], target: Callable[[str], None], timeout: float
) -> None:
    ctx = multiprocessing.get_context(method)
    procs = [ctx.Process(target=target, args=(name,)) for name in names]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout)
    failed = [(p.name, p.exitcode) for p in procs if p.exitcode != 0]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    if failed:
        msg = f"children failed (name, exit code): {failed}"
        raise RuntimeError(msg)


def stop_helpers() -> None:
    """Stop the forkserver and resource tracker `multiprocessing` leaves running.

    Both inherit the envelope; left alive until pytest exits, the session's
    leak check would rightly count them.
    """
    # multiprocessing has no public way to stop them; these are the methods
    # its own test suite uses.
    with contextlib.suppress(Exception):
        multiprocessing.forkserver._forkserver._stop()  # type: ignore[attr-defined]
    with contextlib.suppress(Exception):
        multiprocessing.resource_tracker._resource_tracker._stop()  # type: ignore[attr-defined]
