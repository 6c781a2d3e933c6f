"""fold_plugins: folded (implicit fixed-point) backward passes for iterative solvers.

    import fold_plugins as fp
    x = fp.fold(step, x_star, *params, solver="gmres", tol=1e-10)

See ``fold_plugins.fold.fold`` for the op, ``fold_plugins.solvers`` for the backward solvers,
``fold_plugins.steps`` for ready update steps (which step for which problem: the README),
``fold_plugins.projections`` for projections and proximal operators (``fold_plugins.prox``),
``fold_plugins.diagnostics`` and ``fold_plugins.verify`` for checking a setup, and
``fold_plugins.adapters`` for the drop-ins (``FoldedLoop``, ``FoldedTheseusLayer``). The design
and the mathematics: ``docs/design.md`` in the repository.
"""

from __future__ import annotations

from . import diagnostics, solvers
from ._errors import FoldConvergenceWarning, FoldError, ForwardConvergenceWarning
from .fold import FoldInfo, fold

__all__ = [
    "cones",
    "FoldConvergenceWarning",
    "FoldError",
    "FoldInfo",
    "ForwardConvergenceWarning",
    "diagnostics",
    "fold",
    "preconditioners",
    "projections",
    "prox",
    "solvers",
    "steps",
    "verify",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # these submodules are imported on first use (they are larger)
    if name in ("cones", "preconditioners", "steps", "projections", "prox", "verify"):
        import importlib

        mod = importlib.import_module(f".{name}", __name__)
        globals()[name] = mod
        return mod
    raise AttributeError(f"module 'fold_plugins' has no attribute {name!r}")
