"""cvxpylayers plugin and reference.

``FoldedSolver``: a cvxpylayers ``SolverInterface`` whose backward folds one ADMM step of the
canonical cone program (exact implicit gradient, matrix-free, a few MB; on LPs and QPs GMRES is
preconditioned by the step's exact inverse, 2–3 VJPs) — one keyword switches a layer::

    from cvxpylayers.torch import CvxpyLayer
    from fold_plugins.adapters.cvxpylayers import FoldedSolver, FoldedCvxpyLayer
    layer = CvxpyLayer(problem, parameters=[q, b], variables=[x], solver=FoldedSolver())
    layer = FoldedCvxpyLayer(problem, [q, b], [x], backward="dense")   # the same, as a module

Reference (cross-checks): a cvxpy problem as a differentiable torch function.

    from fold_plugins.adapters.cvxpylayers import cvxpylayers_reference
    ref = cvxpylayers_reference(problem, [q, b], [x])          # tight tolerances by default
    (x_star,) = ref(q_t, b_t)                                   # (B, n) float64, differentiable

Built on ``cvxpylayers.torch.CvxpyLayer`` (cvxpylayers ≥ 1.2): the forward solves the cone
program of ``problem`` for each instance and the backward is diffcp's implicit derivative of
the homogeneous self-dual embedding. cvxpy and cvxpylayers are imported only when a reference
is built (``pip install 'fold-plugins[cvx]'``).

The modules, each importing only those below it:

    solver          FoldedSolver, FoldedCvxpyLayer (imports cvxpylayers: loaded on first use)
    forward         the Clarabel and batched-torch forward solves of the cone program
    preconditioner  the inverse of ``I − Φᵀ`` for the folded step's backward
    program         the program's structure, its data parsed once per call, the ADMM step
    reference       cvxpylayers_reference (and the helpers the diffcp reference shares)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# (``_SOLVE_METHOD``, ``_check_problem``, ``batch_size_of``: what the flat module exposed
# besides __all__; the diffcp reference imports them from .reference)
from .reference import _SOLVE_METHOD as _SOLVE_METHOD
from .reference import TIGHT_SOLVER_ARGS, CvxpyLayersReference, cvxpylayers_reference, import_cvx
from .reference import _check_problem as _check_problem
from .reference import batch_size_of as batch_size_of

if TYPE_CHECKING:  # imported lazily at run time (needs cvxpylayers), see __getattr__
    from .solver import FoldedCvxpyLayer, FoldedSolver

__all__ = ["FoldedSolver", "FoldedCvxpyLayer", "cvxpylayers_reference", "CvxpyLayersReference",
           "TIGHT_SOLVER_ARGS", "import_cvx"]


def __getattr__(name: str) -> Any:
    # FoldedSolver subclasses cvxpylayers' SolverInterface: import cvxpylayers only when asked
    if name in ("FoldedSolver", "FoldedCvxpyLayer"):
        try:
            from . import solver
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f"{name} needs cvxpylayers ≥ 1.2 and clarabel ({e}); install "
                              "them with: pip install 'fold-plugins[cvx]'") from e
        return getattr(solver, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
