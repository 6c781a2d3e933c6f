"""Notes that a step's building blocks leave while :func:`fold` linearises it.

A projection cannot see the :class:`fold_plugins.FoldInfo` of the fold it runs inside, yet it
is the only code that knows, e.g., which constraints are weakly active at ``x*``. While fold
takes its one differentiable step it opens :func:`collect`; building blocks call :func:`note`
and fold copies what was noted into ``FoldInfo.extra``. Outside a fold, :func:`note` does
nothing (no cost, no state).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

__all__ = ["collect", "note", "active"]

_NOTES: contextvars.ContextVar[dict[str, list[Any]] | None] = contextvars.ContextVar(
    "fold_plugins_notes", default=None)


@contextlib.contextmanager
def collect() -> Iterator[dict[str, list[Any]]]:
    """Collect every :func:`note` made inside the block into a dict ``key -> [values]``."""
    notes: dict[str, list[Any]] = {}
    token = _NOTES.set(notes)
    try:
        yield notes
    finally:
        _NOTES.reset(token)


def active() -> bool:
    """Whether a :func:`collect` block is open (lets callers skip work nobody reads)."""
    return _NOTES.get() is not None


def note(key: str, value: Any) -> None:
    """Record ``value`` under ``key`` in the innermost open :func:`collect` block, if any."""
    notes = _NOTES.get()
    if notes is not None:
        notes.setdefault(key, []).append(value)
