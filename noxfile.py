"""This repository's nox sessions: its own suite across the test matrix.

``nox -j auto -t tests`` runs tests/integration once per spawn backend and
transport of ``[tool.harness]`` in pyproject.toml, every session at once and
each inside its own harness session. ``harness matrix`` lists them.
"""

from __future__ import annotations

import harness.nox_sessions

harness.nox_sessions.register()
