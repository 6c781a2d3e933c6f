"""Drop-in adapters, installed as ``fold_plugins.adapters``.

The repository keeps them in its top-level ``adapters/`` folder; the package is installed (and
imported) only as ``fold_plugins.adapters`` so that it can never collide with another
distribution's top-level ``adapters`` package.

    from fold_plugins.adapters import FoldedLoop, folded, unroll, truncated
    from fold_plugins.adapters import FoldedTheseusLayer      # needs theseus-ai

Each adapter imports its own ecosystem (theseus, cvxpy, cvxpylayers, diffcp) lazily, so
importing this package needs only torch.
"""

from __future__ import annotations

from typing import Any

from .base import FoldedModule
from .unrolled import FoldedLoop, folded, truncated, unroll

__all__ = ["FoldedModule", "FoldedLoop", "folded", "unroll", "truncated", "FoldedTheseusLayer"]


def __getattr__(name: str) -> Any:
    # FoldedTheseusLayer's module imports theseus only when a layer is built, but keep the
    # import of this package cheap and free of theseus-specific failure modes anyway.
    if name == "FoldedTheseusLayer":
        from .theseus import FoldedTheseusLayer

        return FoldedTheseusLayer
    raise AttributeError(f"module 'fold_plugins.adapters' has no attribute {name!r}")
