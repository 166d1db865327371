"""Isolated, leak-checked test sessions for multi-process Python runtimes.

Each session gets a port lease, a private bindspace for Unix sockets and one
envelope (the encoded runtime vars) that every child process inherits; after
the run the harness reports what leaked and reaps it on request.
"""

from __future__ import annotations

__version__ = "0.1.0"
