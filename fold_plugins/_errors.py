"""Errors and warnings raised by fold_plugins."""

from __future__ import annotations


class FoldError(RuntimeError):
    """Bad input to a folded op, or a failure that ``strict=True`` refuses to let pass."""


class FoldConvergenceWarning(RuntimeWarning):
    """A forward or backward solve did not reach its tolerance; the gradient may be inexact."""
