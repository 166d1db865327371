"""A tiny registry for the integration suite, and the child that joins it.

The registry is a stream server on the session's registry address: TCP on
``('127.0.0.1', <leased port>)``, or a Unix socket ``<folder>/<name>`` in the
bindspace. Each connection sends one JSON line and gets one JSON line back:

- ``{"op": "register", "name": ..., "pid": ..., "envelope": ...}`` adds an
  entry and answers ``{"ok": true}``;
- ``{"op": "list"}`` answers ``{"ok": true, "entries": [...]}``.

`join` is what a child does, knowing nothing but its environment: it reads
the envelope, connects to the registry address over the envelope's
transport, and registers. Run as a script (``python tiny_registry.py NAME``)
it joins as NAME, as a script started by a test with `subprocess` would.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import socketserver
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.rtvars import RT_VARS_ENV, load_rtvars

Addr = tuple[str, int | str]


def unix_path(addr: Addr) -> str:
    """The socket file of a uds registry address ``(folder, name)``."""
    return os.path.join(addr[0], str(addr[1]))


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        registry: Registry = self.server.registry  # type: ignore[attr-defined]
        line = self.rfile.readline()
        try:
            request = json.loads(line)
            answer = registry.answer(request)
        except (ValueError, KeyError, TypeError) as exc:
            answer = {"ok": False, "error": f"bad request {line[:80]!r}: {exc}"}
        self.wfile.write(json.dumps(answer).encode() + b"\n")


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


class Registry:
    """What joined, in order; served on one address until `close`."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        if request["op"] == "register":
            entry = {
                "name": str(request["name"]),
                "pid": int(request["pid"]),
                "envelope": request["envelope"],
                "extra": request.get("extra", {}),
            }
            with self._lock:
                self.entries.append(entry)
            return {"ok": True}
        if request["op"] == "list":
            with self._lock:
                return {"ok": True, "entries": list(self.entries)}
        return {"ok": False, "error": f"unknown op {request['op']!r}"}

    def names(self) -> list[str]:
        with self._lock:
            return [entry["name"] for entry in self.entries]

    def entry(self, name: str) -> dict[str, Any]:
        with self._lock:
            for entry in self.entries:
                if entry["name"] == name:
                    return entry
        msg = f"{name!r} never registered; registered: {self.names()}"
        raise LookupError(msg)


@contextlib.contextmanager
def serve(addr: Addr, transport: str) -> Iterator[Registry]:
    """Serve a `Registry` on *addr* over *transport* for the block.

    A uds socket file is removed afterwards, so the session does not count
    it as a leak.
    """
    registry = Registry()
    server: socketserver.BaseServer
    if transport == "tcp":
        server = _TCPServer((str(addr[0]), int(addr[1])), _Handler)
    elif transport == "uds":
        Path(addr[0]).mkdir(mode=0o700, parents=True, exist_ok=True)
        server = _UnixServer(unix_path(addr), _Handler)
    else:
        msg = f"the tiny registry speaks tcp and uds, not {transport!r}"
        raise ValueError(msg)
    server.registry = registry  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield registry
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
        if transport == "uds":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(unix_path(addr))


def request(payload: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Send *payload* to the registry the envelope names; return the answer."""
    rtvars = load_rtvars()
    if not rtvars._registry_addrs:
        msg = f"{RT_VARS_ENV} names no registry: {os.environ.get(RT_VARS_ENV)!r}"
        raise RuntimeError(msg)
    addr = rtvars._registry_addrs[0]
    transport = rtvars.tpt_proto or "tcp"
    if transport == "uds":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: Any = unix_path(addr)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        target = (str(addr[0]), int(addr[1]))
    with sock:
        sock.settimeout(timeout)
        sock.connect(target)
        sock.sendall(json.dumps(payload).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)  # type: ignore[no-any-return]


def join(name: str, extra: dict[str, Any] | None = None) -> None:
    """Register this process as *name*, from its envelope alone."""
    answer = request(
        {
            "op": "register",
            "name": name,
            "pid": os.getpid(),
            "envelope": os.environ.get(RT_VARS_ENV),
            "extra": extra or {},
        }
    )
    if not answer.get("ok"):
        raise RuntimeError(f"registry refused {name!r}: {answer}")


def join_with_grandchild(name: str) -> None:
    """Join as *name*, then start a plain grandchild that joins too."""
    join(name)
    import subprocess

    subprocess.run([sys.executable, __file__, f"{name}.grandchild"], check=True)


if __name__ == "__main__":
    join(sys.argv[1])
