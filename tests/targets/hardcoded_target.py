"""A target that hard-codes its addresses, as tractor's suite does today.

It listens on TCP ``127.0.0.1:<port>`` (default 1616) and on the Unix socket
``$XDG_RUNTIME_DIR/tractor/registry@<port>.sock``, prints one JSON line saying
whether it got both, holds them until its stdin is closed, then connects to
each of its own listeners and checks that the bytes it sent came back to
itself. A second line of JSON gives the verdict for each address: ``ok``,
``collision: ...`` (taken by another process) or ``crosstalk: ...`` (the name
now leads to another process). The exit status is 0 when both are ``ok``,
else 3.

Run standalone (stdlib only) so the tests can start many at once, with and
without isolation, and release them together: that makes the overlap, and so
the collision, certain rather than a matter of timing.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys


def bind_tcp(port: int) -> tuple[socket.socket | None, str]:
    """Listen on 127.0.0.1:*port* the way trio does (with SO_REUSEADDR)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        # Two sockets with SO_REUSEADDR may both bind; only one may listen.
        sock.bind(("127.0.0.1", port))
        sock.listen()
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            return None, f"collision: 127.0.0.1:{port} is taken"
        return None, f"error: {exc}"
    return sock, "bound"


def bind_uds(path: str) -> tuple[socket.socket | None, str]:
    """Listen on *path*, replacing a stale socket file but never a live one."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
        else:
            return None, f"collision: {path} is served by another process"
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            return None, f"collision: {path} is taken"
        return None, f"error: {exc}"
    sock.listen()
    return sock, "bound"


def talk_to_self(
    listener: socket.socket, family: int, address: object
) -> tuple[str, int]:
    """Connect to *address*; check that *listener* got the bytes sent.

    Returns the verdict and how many connections from other processes were
    waiting on *listener* (another instance probing a shared socket name).
    """
    token = f"{os.getpid()}:{family}".encode()
    foreign = 0
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(address)
        client.sendall(token)
        listener.settimeout(10)
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                return "crosstalk: the connection reached another process", foreign
            with conn:
                conn.settimeout(10)
                got = conn.recv(len(token))
                if got != token:
                    foreign += 1
                    continue
                conn.sendall(got)
            break
        echoed = client.recv(len(token))
    return ("ok" if echoed == token else f"crosstalk: got {echoed!r}"), foreign


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def main() -> int:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 1616
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if not runtime:
        print(json.dumps({"phase": "bound", "error": "XDG_RUNTIME_DIR is not set"}))
        return 2
    uds_path = os.path.join(runtime, "tractor", f"registry@{port}.sock")

    tcp, tcp_state = bind_tcp(port)
    uds, uds_state = bind_uds(uds_path)
    uds_inode = _inode(uds_path) if uds else None
    netns = os.readlink("/proc/self/ns/net")
    print(
        json.dumps({"phase": "bound", "tcp": tcp_state, "uds": uds_state}), flush=True
    )

    # Hold both listeners until the test releases every instance at once.
    sys.stdin.read()

    verdict = {
        "phase": "done",
        "pid": os.getpid(),
        "netns": netns,
        "uds_path": uds_path,
    }
    foreign = 0
    if tcp:
        verdict["tcp"], seen = talk_to_self(tcp, socket.AF_INET, ("127.0.0.1", port))
        foreign += seen
    else:
        verdict["tcp"] = tcp_state
    if uds and _inode(uds_path) != uds_inode:
        # Another instance found the file before this one listened on it,
        # took it for stale, and replaced it: the name now leads elsewhere.
        verdict["uds"] = f"crosstalk: {uds_path} was replaced by another process"
    elif uds:
        verdict["uds"], seen = talk_to_self(uds, socket.AF_UNIX, uds_path)
        foreign += seen
        os.unlink(uds_path)
    else:
        verdict["uds"] = uds_state
    verdict["foreign_connections"] = foreign
    print(json.dumps(verdict), flush=True)
    return 0 if verdict["tcp"] == "ok" and verdict["uds"] == "ok" else 3


if __name__ == "__main__":
    sys.exit(main())
