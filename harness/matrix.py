"""The test matrix: backends x transports x Python versions, minus exclusions.

This is the one place that turns ``[tool.harness]`` into session names. The
nox sessions (`harness.nox_sessions`), the GitHub Actions matrix
(``harness matrix --json``) and the README's list (``harness matrix``) are
all built from `Matrix`, so they cannot disagree.

A *cell* is one (backend, transport) pair and becomes one nox session named
``<prefix>-<backend>-<transport>``, tagged ``<prefix>``, ``<backend>`` and
``<transport>``. With Python versions configured, a cell becomes one *run*
per version, named ``<session>-<python>`` as nox names such sessions, and
tagged with the cell's session name as well: that name is what a CI job
passes to ``nox -s``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from harness.config import Exclusion, HarnessConfig, load_config

log = logging.getLogger("harness.matrix")


class Cell(msgspec.Struct, frozen=True, kw_only=True):
    """One nox session of the matrix: a backend and a transport."""

    session: str
    """The nox session name, ``<prefix>-<backend>-<transport>``."""
    backend: str
    transport: str
    pythons: tuple[str, ...] = ()
    """The Python versions it runs on; empty: nox's own interpreter."""
    tags: tuple[str, ...] = ()

    def runs(self) -> list[Run]:
        """One `Run` per Python version (one with ``python=None`` if none)."""
        if not self.pythons:
            return [Run(cell=self, python=None)]
        return [Run(cell=self, python=python) for python in self.pythons]


class Run(msgspec.Struct, frozen=True, kw_only=True):
    """One cell on one Python version: one GitHub Actions job."""

    cell: Cell
    python: str | None

    @property
    def name(self) -> str:
        """What ``nox -s`` takes: ``tests-trio-tcp`` or ``tests-trio-tcp-3.13``."""
        if self.python is None:
            return self.cell.session
        return f"{self.cell.session}-{self.python}"

    @property
    def tags(self) -> tuple[str, ...]:
        """The cell's tags; with a Python version also the cell's session
        name, so ``nox -t tests-trio-tcp`` runs it on every version."""
        if self.python is None:
            return self.cell.tags
        return (*self.cell.tags, self.cell.session)


class Excluded(msgspec.Struct, frozen=True, kw_only=True):
    """A (backend, transport, python) combination an exclusion removed."""

    session: str
    backend: str
    transport: str
    python: str | None
    exclusion: Exclusion


class Matrix:
    """The cells of a project's matrix, in configuration order."""

    def __init__(self, config: HarnessConfig) -> None:
        self.config = config
        self.cells: list[Cell] = []
        self.excluded: list[Excluded] = []
        pythons: list[str | None] = list(config.pythons) or [None]
        for backend in config.backends:
            for transport in config.transports:
                session = f"{config.session_prefix}-{backend}-{transport}"
                kept: list[str] = []
                for python in pythons:
                    exclusion = _first_match(config.exclude, backend, transport, python)
                    if exclusion is not None:
                        self.excluded.append(
                            Excluded(
                                session=session,
                                backend=backend,
                                transport=transport,
                                python=python,
                                exclusion=exclusion,
                            )
                        )
                    elif python is not None:
                        kept.append(python)
                if config.pythons and not kept:
                    continue
                if not config.pythons and any(
                    e.session == session for e in self.excluded
                ):
                    continue
                self.cells.append(
                    Cell(
                        session=session,
                        backend=backend,
                        transport=transport,
                        pythons=tuple(kept),
                        tags=(config.session_prefix, backend, transport),
                    )
                )

    @classmethod
    def load(cls, path: Path | str | None = None) -> Matrix:
        """The matrix of the ``pyproject.toml`` at or above *path* (default:
        the current directory). Raises `HarnessError` for a bad table."""
        return cls(load_config(path))

    def __iter__(self) -> Iterator[Cell]:
        return iter(self.cells)

    def __len__(self) -> int:
        return len(self.cells)

    def runs(self) -> list[Run]:
        """Every (cell, Python version) pair, cells first."""
        return [run for cell in self.cells for run in cell.runs()]

    def names(self) -> list[str]:
        """The ``nox -s`` names of every run, in order."""
        return [run.name for run in self.runs()]

    def cell(self, session: str) -> Cell:
        """The cell named *session*; `KeyError` if there is none."""
        for cell in self.cells:
            if cell.session == session:
                return cell
        raise KeyError(session)

    def github(self) -> dict[str, Any]:
        """The GitHub Actions matrix: ``{"include": [...]}``, one job per run.

        Each entry has ``session`` (for ``nox -s``), ``backend``,
        ``transport``, ``python`` (``null`` when no versions are configured:
        the workflow picks its default) and ``tags``.
        """
        return {
            "include": [
                {
                    "session": run.name,
                    "backend": run.cell.backend,
                    "transport": run.cell.transport,
                    "python": run.python,
                    "tags": list(run.tags),
                }
                for run in self.runs()
            ]
        }


def _first_match(
    exclusions: list[Exclusion], backend: str, transport: str, python: str | None
) -> Exclusion | None:
    for exclusion in exclusions:
        if exclusion.matches(backend, transport, python):
            return exclusion
    return None
